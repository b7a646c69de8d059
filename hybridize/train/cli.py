"""`hybridize train RECIPE.yaml`: a thin layer over hybridize.train.trainer.train."""

from __future__ import annotations

import sys

import click


@click.command("train")
@click.argument("recipe_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a recipe field, e.g. --set stages[0].lr=1e-4 --set output.dir=runs/x (repeatable)")
@click.option("--resume", is_flag=True, help="continue from the latest checkpoint in output.dir")
def train(recipe_file, overrides, resume):
    """Run the stages of RECIPE_FILE (align -> distil -> extend), on one process or under `accelerate launch`."""
    from safetensors import SafetensorError

    from ..errors import UserError
    from .recipe import load_recipe
    from .trainer import NonFiniteLossError, TrainingInterrupted, train as run_training

    try:
        recipe = load_recipe(recipe_file, overrides)
        result = run_training(recipe, resume=resume)
    except TrainingInterrupted as e:
        click.echo(f"stopped: {e}", err=True)
        sys.exit(130)
    except OSError as e:  # disk full, read-only or missing paths: the system's words, with the path when it has one
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        raise UserError(message.splitlines()[0] if message else type(e).__name__) from None
    except (ValueError, NotImplementedError, ImportError, NonFiniteLossError, SafetensorError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if result.model_dir is not None:
        click.echo(f"wrote {result.model_dir} ({result.tokens:,} training tokens, {result.global_step} steps)")
