"""Command line: each command is a thin layer over a library function."""

from __future__ import annotations

import signal
import shlex
import sys
import threading

import click

from .errors import UserError, _fail_cleanly

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


def _interrupt_on_sigterm(ctx: click.Context) -> None:
    """SIGTERM (kill, timeout, a job scheduler) unwinds like Ctrl-C, so that half-written outputs are removed; the
    default action would end the process on the spot and leave them behind."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hybridize")
@click.pass_context
def main(ctx):
    """Turn a dense Llama-family Transformer into a Lightning + InfLLM-V2 sparse hybrid."""
    _interrupt_on_sigterm(ctx)


@main.command()
@click.argument("source", required=False)
@click.option("--ratio", default="1:3", show_default=True,
              help="SPARSE:LINEAR layer ratio (1:0 all sparse, 0:1 all Lightning). Sparse layers = round(L*S/(S+LINEAR)), "
                   "halves rounded up, then at least 1 of each kind whose side is positive: 1:3 keeps 8 of 32 layers, "
                   "8 of 30, 1 of 2.")
@click.option("--layers", default=None, help="explicit sparse layer indices, e.g. 0,9,16 (instead of --ratio)")
@click.option("--select", "select", default=None, metavar="METHOD",
              help="how to place the sparse layers: block_influence (default for models up to 1.5B parameters with "
                   "a tokenizer: the layers that change the residual stream most), uniform (default above; evenly "
                   "spaced, last layer included), layers (the --layers list), window (with --lightning-window: the layers "
                   "retrieval needs whole when the others see only the window), or sala and the other scoring methods "
                   "registered in hybridize.select.registry (sala retrieved better than block_influence after the "
                   "retention recipe's training; recipes/retention.yaml places by window, with a 256-token window)")
@click.option("--score-report", default=None, type=click.Path(),
              help="with --select sala: reuse the report.json (or folder) `hybridize score` wrote instead of scoring")
@click.option("--students", default=None, type=click.Path(),
              help="students.safetensors from `hybridize score`: aligned weights for the Lightning layers")
@click.option("--config", "config", default=None, type=click.Path(),
              help="config.json for a bare state-dict file (default: the config.json beside it)")
@click.option("--output", "-o", default="hybrid-model", show_default=True, help="output folder")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="weights dtype of the output (default: the source's)")
@click.option("--max-shard-size", default="2GB", show_default=True, help="safetensors shard size of the output")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--hype/--no-hype", default=True, show_default=True, help="NoPE in sparse layers, RoPE in Lightning")
@click.option("--gates/--no-gates", default=True, show_default=True, help="new sigmoid output gates")
@click.option("--calibrate/--no-calibrate", default=None,
              help="fit the Lightning layers' output norms to the source on 2K tokens of the built-in plays (default: "
                   "on for models up to 1.5B parameters with a tokenizer; the source runs on the CPU)")
@click.option("--lightning-window", type=click.IntRange(min=0), default=0, show_default=True,
              help="tokens of softmax attention (the source's own) kept in every Lightning layer beside its recurrent "
                   "state, 0 for none: a fresh conversion then computes the source with its attention cut to the "
                   "window and the first --lightning-sinks tokens")
@click.option("--lightning-sinks", type=click.IntRange(min=0), default=4, show_default=True,
              help="first tokens of each sequence that the Lightning window branch always reads")
@click.option("--lightning-sink-reach", type=click.IntRange(min=0), default=None, metavar="TOKENS",
              help="the window branch reads a sink further back than this as if it lay this far back (default: the "
                   "source's context, so that past it the branch sees no distance the source was not trained on; "
                   "0: the true distance)")
@click.option("--rope-yarn", type=float, default=0.0, show_default=True, metavar="FACTOR",
              help="rescale RoPE YaRN-style by FACTOR over the source's context in every layer, for reading past it "
                   "(0: the source's RoPE)")
@click.option("--sample/--no-sample", default=None,
              help="print a before/after generation (default: on for models up to 1.5B parameters)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def convert(source, ratio, layers, select, score_report, students, config, output, dtype, max_shard_size, force, hype,
            gates, calibrate, lightning_window, lightning_sinks, lightning_sink_reach, rope_yarn, sample, quiet):
    """Convert SOURCE into a hybrid model folder.

    SOURCE: a Hugging Face model folder or a hub id in the local cache; a .safetensors/.bin/.pt/.ckpt/.pth state
    dict (config.json beside it or --config); Meta's consolidated.*.pth + params.json folder; a .gguf file.
    Without SOURCE: the built-in SmolLM2-135M-Instruct. Families: Llama 1-3.x, Mistral, Qwen2/2.5, Qwen3, Phi-3.
    """
    from .convert.converter import convert as run_convert
    from .convert.samples import before_after, should_sample, wants_sample

    layer_list = None
    if layers is not None:
        try:
            layer_list = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--layers must be comma-separated integers, got {layers!r}") from None
        if not layer_list:  # an empty list would silently make every layer Lightning
            raise UserError("--layers is empty: list the sparse layer indices (e.g. --layers 0,9,16), or use "
                            "--ratio 0:1 for an all-Lightning model")
    result = _fail_cleanly(
        run_convert, source, output, ratio=ratio, layers=layer_list, select=select, config=config, hype=hype,
        gates=gates, dtype=dtype, force=force, max_shard_size=max_shard_size, progress=not quiet,
        select_options={"score_report": score_report} if score_report else None, students=students,
        keep_source=lambda ckpt: wants_sample(ckpt, sample), calibrate=calibrate,
        lightning_window=lightning_window, lightning_sinks=lightning_sinks, lightning_sink_reach=lightning_sink_reach,
        rope_yarn=rope_yarn,
    )
    click.echo(f"wrote {result.output} ({len(result.sparse_layers)} sparse of {result.num_layers} layers, placed by "
               f"{result.method}: {result.sparse_layers})")
    for note in result.extras.get("notes", []):
        click.echo(f"note: {note}")
    if result.calibration and result.calibration["mean_relative_error"] is not None:
        click.echo(f"Lightning output norms fitted to the source on {result.calibration['tokens']} tokens (mean "
                   f"relative error {result.calibration['mean_relative_error']:.2f}; 1 = a layer that outputs nothing)")
    if should_sample(result, sample):
        samples = before_after(result)
        if samples is None:
            click.echo("no sample: the source has no tokenizer")
        else:
            click.echo(f"prompt: {samples.prompt!r}")
            click.echo(f"source: {samples.source!r}")
            click.echo(f"hybrid: {samples.hybrid!r}")
    # a fresh conversion is not yet a usable model (bench/results/retention.md): say what recovers it
    source_set = f" --set model.source={shlex.quote(str(source))}" if source else ""
    click.echo(f"next: train it to recover the source's quality: hybridize train recipes/retention.yaml{source_set} "
               f"(one GPU, 14 minutes of training; it converts with its own settings and trained the SmolLM2 hybrid "
               f"to 1.06x the source's held-out perplexity, keeping 55 of its 57 factual answers and 33 of 42 pass "
               f"keys)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
