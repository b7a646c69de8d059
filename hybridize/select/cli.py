"""`hybridize score`: a thin layer over hybridize.select.api.score."""

from __future__ import annotations

import dataclasses

import click


def _lengths(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integers, got {text!r}", param_hint=option) from None
    if not values:
        raise click.BadParameter("give at least one length", param_hint=option)
    return values


@click.command()
@click.argument("source", required=False)
@click.option("--output", "-o", default="layer-scores", show_default=True,
              help="report folder (report.json, scores.png, students.safetensors)")
@click.option("--method", type=click.Choice(["sala", "block_influence", "window"]), default="sala", show_default=True,
              help="sala: align students + sweep (docs/design.md §3.3); window: every layer cut to "
                   "--window tokens, then full attention given back, one layer a round, where retrieval gains most "
                   "(no training); block_influence: cheap "
                   "1 - cos(in, out) proxy")
@click.option("--window", type=int, default=None, help="the window method's cut: last tokens kept [256]")
@click.option("--sinks", type=int, default=None, help="the window method's cut: first tokens kept [4]")
@click.option("--ratio", default="1:3", show_default=True, help="sparse:linear layer ratio")
@click.option("--keep-first-last/--no-keep-first-last", default=True, show_default=True,
              help="always keep the first and last layers as attention (SALA)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--gpu-defaults", is_flag=True, help="the larger GPU settings (512-token alignment, longer probes); on by itself when CUDA is available")
@click.option("--seq-len", type=int, default=None, help="alignment sequence length [CPU 256, GPU 512]")
@click.option("--align-steps", type=int, default=None, help="alignment steps [CPU 48, GPU 200]")
@click.option("--align-batch", type=int, default=None, help="alignment batch size [CPU 2, GPU 8]")
@click.option("--heldout-seqs", type=int, default=None, help="held-out sequences for the loss probe [CPU 4]")
@click.option("--passkey-lengths", default=None,
              help="comma-separated passkey lengths [CPU 256,512; window method: CPU 1024, GPU 1024,2048,4096]")
@click.option("--kv-lengths", default=None,
              help="comma-separated key-value lookup lengths [CPU 256,512; window method: CPU none, GPU 1024,2048]")
@click.option("--samples", type=int, default=None, help="probe samples per task and length [CPU 2]")
@click.option("--text", default=None, metavar="SOURCE",
              help="calibration text: a .txt file, a folder of .txt files (the last fifth held out), 'teacher' "
                   "(sampled from the model) or 'shakespeare' [default: the Shakespeare corpus, else 'teacher']")
@click.option("--gates/--no-gates", default=True, show_default=True, help="students carry the output gate")
@click.option("--hype/--no-hype", default=True, show_default=True,
              help="the window method: measure the layers it keeps whole without RoPE, as a HyPE hybrid (convert's "
                   "default) runs its sparse layers")
@click.option("--general-weight", type=float, default=None,
              help="the window method: each round adds this times the held-out text's next-token log-probability "
                   "(text past the window) to the probes' answer log-probability, so that layers the text needs "
                   "count too [0]")
@click.option("--compare-uniform", is_flag=True,
              help="also report held-out loss of the chosen and the uniform hybrid, both with the aligned students")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="load the model in this dtype (bfloat16 for large models on a GPU)")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
@click.option("--force", is_flag=True, help="replace an existing output folder")
@click.option("--quiet", is_flag=True, help="no progress bars")
def score(source, output, method, window, sinks, ratio, keep_first_last, seed, gpu_defaults, seq_len, align_steps,
          align_batch, heldout_seqs, passkey_lengths, kv_lengths, samples, text, gates, hype, general_weight,
          compare_uniform, dtype, threads, force, quiet):
    """Score the layers of SOURCE (default: the built-in SmolLM2-135M) and choose which stay attention."""
    import torch

    from ..errors import _fail_cleanly
    from .api import ScoreSettings, score as run_score

    if threads is not None:
        if threads < 1:
            raise click.BadParameter("must be at least 1", param_hint="--threads")
        torch.set_num_threads(threads)
    base = ScoreSettings.defaults(method, gpu_defaults or torch.cuda.is_available(),
                                  **{k: v for k, v in (("window", window), ("sinks", sinks)) if v is not None})
    align = dataclasses.replace(base.align, **{k: v for k, v in (("steps", align_steps), ("batch_size", align_batch))
                                              if v is not None})
    probes = dataclasses.replace(base.probes, **{k: v for k, v in (
        ("passkey_lengths", passkey_lengths and _lengths(passkey_lengths, "--passkey-lengths")),
        ("kv_lengths", kv_lengths and _lengths(kv_lengths, "--kv-lengths")),
        ("samples_per_length", samples)) if v is not None})
    overrides = {k: v for k, v in (("seq_len", seq_len), ("heldout_seqs", heldout_seqs),
                                   ("general_weight", general_weight)) if v is not None}
    settings = dataclasses.replace(base, ratio=ratio, keep_first_last=keep_first_last, seed=seed,
                                   text=text, gates=gates, compare_uniform=compare_uniform, align=align,
                                   nope=hype and method == "window",
                                   probes=probes, **overrides)
    result = _fail_cleanly(run_score, source, output, settings, force=force, progress=not quiet, dtype=dtype)
    rep = result.report
    click.echo(f"wrote {output}: {len(rep['chosen_layers'])} sparse of {rep['num_layers']} layers "
               f"{rep['chosen_layers']} ({rep['method']}, {rep['wall_time_s']:.0f} s)")
    if "compare" in rep:
        c = rep["compare"]
        click.echo(f"held-out loss (aligned students, RoPE kept): {method} {c[method]['loss_rope']:.4f}, "
                   f"uniform {c['uniform']['loss_rope']:.4f}, teacher {c['teacher_loss']:.4f}")
