"""`hybridize eval` and `hybridize bench`: thin click layers over hybridize.eval.evaluate."""

from __future__ import annotations

import sys

import click

from ..errors import UserError, _fail_cleanly


def _split(text: str, convert, what: str) -> tuple:
    try:
        return tuple(convert(x.strip()) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def _length(x: str) -> int:
    from .speed import parse_length

    return parse_length(x)


@click.command("eval")
@click.argument("model")
@click.option("--compare", default=None, help="source model to compare with: a folder, hub id, .gguf or 'default'")
@click.option("--text", "texts", multiple=True, default=("shakespeare",), show_default=True,
              help="perplexity text: a file, a folder of .txt, 'shakespeare' or hf:NAME[:CONFIG[:SPLIT]] (repeatable)")
@click.option("--seq-len", default=512, show_default=True, help="perplexity window (tokens)")
@click.option("--max-windows", default=8, show_default=True, help="perplexity windows per text (0: all)")
@click.option("--lengths", default=None, help="retrieval context lengths, e.g. 4K,32K [default: 256,512,1024; "
              "retention: 1K,2K,4K,8K,16K,32K,64K]")
@click.option("--depths", default=None, help="needle depths in [0, 1] [default: 0,0.25,0.5,0.75,1; retention: "
              "0.1,0.5,0.9]")
@click.option("--trials", default=None, type=int, help="probes per length and depth [default: 1; retention: 3]")
@click.option("--no-retrieval", is_flag=True, help="skip the pass-key probes")
@click.option("--chunk-size", default=16384, show_default=True, help="prefill chunk (tokens)")
@click.option("--output", "-o", default=None, help="results folder (default: MODEL/eval)")
@click.option("--force", is_flag=True, help="replace an existing results folder")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
@click.option("--trust-remote-code", is_flag=True,
              help="let MODEL and --compare run the Python files their folders ship (config.json auto_map); off by "
                   "default. Hybrids always load with the installed hybridize classes")
@click.option("--suite", type=click.Choice(["eval", "retention"]), default="eval", show_default=True,
              help="retention: held-out perplexity, NLL by position, passkey/multikey/kv retrieval, agreement with "
                   "and knowledge kept from --compare (the reference); writes retention.json/.md (default folder "
                   "MODEL/retention)")
@click.option("--sources", default=None, help="retention: perplexity texts, comma-separated (news, wiki, pydoc, "
              "shakespeare, files) [default: wiki,news,pydoc,shakespeare]")
@click.option("--windows", default=None, help="retention: perplexity windows, e.g. 512,2K,8K")
@click.option("--tasks", default=None, help="retention: retrieval tasks (passkey, multikey, kv) [default: all]")
@click.option("--position-len", default=None, help="retention: window of the NLL-by-position curve (e.g. 32K)")
@click.option("--quick", is_flag=True, help="retention: tiny lengths and counts (a smoke test)")
@click.option("--reuse-reference", default=None, type=click.Path(),
              help="retention: an earlier retention.json with the same --compare and settings; the reference's "
                   "measurements are taken from it instead of measured again (agreement is still measured)")
@click.option("--data-dir", default=None, help="retention: folder holding gensim's lee_background.cor and enwiki "
              "test files (default: the installed gensim package)")
@click.option("--lm-eval-tasks", default=None, help="retention: lm-evaluation-harness tasks, comma-separated "
              "(needs lm_eval; offline)")
@click.option("--lm-eval-include-path", default=None,
              help="retention: folder of local lm-evaluation-harness task files")
def eval_command(model, compare, texts, seq_len, max_windows, lengths, depths, trials, no_retrieval, chunk_size,
                 output, force, dtype, device, trust_remote_code, suite, sources, windows, tasks, position_len, quick,
                 data_dir, lm_eval_tasks, lm_eval_include_path, reuse_reference):
    """Perplexity, pass-key retrieval and samples for MODEL, beside --compare SOURCE (--suite retention: what MODEL
    kept of SOURCE)."""
    if suite == "retention":
        return _retention(model, compare, lengths=lengths, depths=depths, trials=trials, chunk_size=chunk_size,
                          output=output, force=force, dtype=dtype, device=device, sources=sources, windows=windows,
                          tasks=tasks, position_len=position_len, quick=quick, data_dir=data_dir,
                          lm_eval_tasks=lm_eval_tasks, lm_eval_include_path=lm_eval_include_path,
                          trust_remote_code=trust_remote_code, reuse_reference=reuse_reference)
    if reuse_reference is not None:
        raise UserError("--reuse-reference belongs to the retention suite: add --suite retention")
    from .evaluate import EvalSettings, run_eval
    from .report import eval_table

    settings = _fail_cleanly(
        EvalSettings, texts=tuple(texts), seq_len=seq_len, max_windows=max_windows or None,
        lengths=_split(lengths or "256,512,1024", _length, "--lengths"),
        depths=_split(depths or "0,0.25,0.5,0.75,1", float, "--depths"), trials=trials or 1,
        retrieval=not no_retrieval, chunk_size=chunk_size, progress=sys.stderr.isatty(),
    )
    results, paths = _fail_cleanly(run_eval, model, compare, output=output, force=force, dtype=dtype, device=device,
                                   settings=settings, trust_remote_code=trust_remote_code)
    click.echo(eval_table(results))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def _retention(model, compare, *, lengths, depths, trials, chunk_size, output, force, dtype, device, sources, windows,
               tasks, position_len, quick, data_dir, lm_eval_tasks, lm_eval_include_path, trust_remote_code,
               reuse_reference):
    from .retention import RetentionSettings, run_retention

    given = {"lengths": lengths and _split(lengths, _length, "--lengths"),
             "depths": depths and _split(depths, float, "--depths"), "trials": trials,
             "sources": sources and _split(sources, str, "--sources"),
             "windows": windows and _split(windows, _length, "--windows"),
             "tasks": tasks and _split(tasks, str, "--tasks"),
             "position_len": position_len and _length(position_len), "data_dir": data_dir,
             "lm_eval_tasks": lm_eval_tasks and _split(lm_eval_tasks, str, "--lm-eval-tasks"),
             "lm_eval_include_path": lm_eval_include_path}
    given = {k: v for k, v in given.items() if v is not None}
    settings = _fail_cleanly(RetentionSettings.quick if quick else RetentionSettings, chunk_size=chunk_size,
                             progress=sys.stderr.isatty(), **given)
    results, paths = _fail_cleanly(run_retention, model, compare, output=output, force=force, dtype=dtype,
                                   device=device, settings=settings, trust_remote_code=trust_remote_code,
                                   log=lambda line: click.echo(f"measured {line}", err=True),
                                   reuse_reference=reuse_reference)
    from .report import retention_markdown

    click.echo(retention_markdown(results))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@click.command("bench")
@click.argument("model", required=False)
@click.option("--compare", default=None, help="source model to compare with: a folder, hub id, .gguf or 'default'")
@click.option("--shape", default=None, help="benchmark a weightless shape and its hybrid instead (llama3-8b, "
              "smollm2-135m, tiny)")
@click.option("--ratio", default="1:3", show_default=True, help="sparse:linear ratio of the --shape hybrid")
@click.option("--sparse-selection", type=click.Choice(["token", "block"]), default=None,
              help="--shape hybrid: exact per-token block selection or one selection per 64-query group")
@click.option("--normalizer", type=click.Choice(["coarse", "exact"]), default=None,
              help="--shape hybrid: selection softmax normaliser from coarse keys (the config default) or every "
                   "compressed key")
@click.option("--lengths", default="1K,2K,4K", show_default=True, help="context lengths (e.g. 32K,128K,1M)")
@click.option("--chunk-size", default=16384, show_default=True, help="prefill chunk (tokens)")
@click.option("--decode-batch", "decode_batches", default="1", show_default=True, help="decode batch sizes, e.g. 1,8")
@click.option("--decode-steps", default=16, show_default=True)
@click.option("--time-cap", default=None, type=float, help="seconds per model; longer lengths are skipped")
@click.option("--warmup", default=None, help="warm-up prefill length before timing (default: a hybrid's longest length up to 256K, "
              "a dense model's shortest; 0: none)")
@click.option("--output", "-o", default=None, help="results folder (default: MODEL/bench)")
@click.option("--force", is_flag=True, help="replace an existing results folder")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
@click.option("--no-plots", is_flag=True)
@click.option("--trust-remote-code", is_flag=True,
              help="let MODEL and --compare run the Python files their folders ship (config.json auto_map); off by "
                   "default. Hybrids always load with the installed hybridize classes")
def bench_command(model, compare, shape, ratio, sparse_selection, normalizer, lengths, chunk_size, decode_batches, decode_steps, time_cap, warmup,
                  output, force, dtype, device, no_plots, trust_remote_code):
    """Time to first token, decode tokens/s and peak memory over context lengths (OOM is a result)."""
    from .evaluate import run_bench_command
    from .report import bench_table

    command = "hybridize bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    report, paths = _fail_cleanly(
        run_bench_command, model, compare, shape=shape, ratio=ratio, lengths=_split(lengths, _length, "--lengths"),
        output=output, force=force, dtype=dtype, device=device, chunk_size=chunk_size,
        decode_batches=_split(decode_batches, int, "--decode-batch"), decode_steps=decode_steps, time_cap_s=time_cap,
        warmup_length=(0 if warmup == "0" else _length(warmup)) if warmup else None, plots=not no_plots,
        sparse_selection=sparse_selection, normalizer=normalizer, command=command,
        log=lambda s: click.echo(s, err=True), trust_remote_code=trust_remote_code,
    )
    click.echo(bench_table(report))
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))
