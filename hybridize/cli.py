"""Command line: each command is a thin layer over a library function."""

from __future__ import annotations

import sys

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


# Commands that live in their own modules (imported only when used, so `hybridize --help` stays fast).
LAZY_COMMANDS = {
    "score": "hybridize.select.cli:score",
    "train": "hybridize.train.cli:train",
    "eval": "hybridize.eval.cli:eval_command",
    "bench": "hybridize.eval.cli:bench_command",
    "push": "hybridize.hub:push_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            import importlib

            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ModuleNotFoundError as e:
                if e.name == module:
                    return None  # this command's module is not part of this build
                raise
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hybridize")
def main():
    """Turn a dense Llama-family Transformer into a Lightning + InfLLM-V2 sparse hybrid."""


@main.command()
@click.argument("source", required=False)
@click.option("--ratio", default="1:3", show_default=True, help="sparse:linear layer ratio (e.g. 1:3, 1:0, 0:1)")
@click.option("--layers", default=None, help="explicit sparse layer indices, e.g. 0,9,16 (overrides --ratio)")
@click.option("--output", "-o", default="hybrid-model", show_default=True, help="output folder")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--hype/--no-hype", default=True, show_default=True, help="NoPE in sparse layers, RoPE in Lightning")
@click.option("--gates/--no-gates", default=True, show_default=True, help="new sigmoid output gates")
@click.option("--sample/--no-sample", default=True, show_default=True, help="print a before/after generation")
def convert(source, ratio, layers, output, dtype, force, hype, gates, sample):
    """Convert SOURCE (default: the built-in SmolLM2-135M) into a hybrid model folder."""
    from .convert.converter import convert as run_convert

    layer_list = None
    if layers is not None:
        try:
            layer_list = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--layers must be comma-separated integers, got {layers!r}") from None
    result = _fail_cleanly(
        run_convert, source, output, ratio=ratio, layers=layer_list, hype=hype, gates=gates, dtype=dtype, force=force
    )
    click.echo(f"wrote {result.output} ({len(result.sparse_layers)} sparse of {result.num_layers} layers: "
               f"{result.sparse_layers})")
    if sample:
        from .generate import sample_text

        click.echo(sample_text(result.output))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
