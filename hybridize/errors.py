"""How a command fails on bad input: one line on stderr and exit code 2, never a traceback.

Every command module imports these from here, so that no sub-command needs the top-level CLI module."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A one-line error and exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _fail_cleanly(fn, *args, **kwargs):
    """Run a library call; turn expected failures into one-line errors."""
    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, FileExistsError, ValueError, NotImplementedError, OSError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


__all__ = ["UserError", "_fail_cleanly"]
