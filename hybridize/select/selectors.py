"""The scoring methods as registry selectors (`hybridize convert --select sala|block_influence`).

Signature (hybridize.select.registry): `selector(model, n_sparse, **kw) -> sorted layer indices`.
Keyword arguments understood here:
- `score_report`: a report.json (or the folder) written by `hybridize score`: its per-layer measurements are re-ranked
  for `n_sparse`, nothing is recomputed;
- `tokenizer`: the source's tokenizer (needed when scoring runs);
- `score_settings`: a ScoreSettings for a fresh run; without it the device's default settings are scored once per
  model and method and kept (hybridize.select.cache: `cache_dir`, default ~/.cache/hybridize or $HYBRIDIZE_CACHE);
- `keep_first_last`: override the first/last rule; `log`: where the cache says what it did;
- `window`, `sinks` (the window method): the cut each layer is measured with, to match the hybrid's
  `lightning_window` and `lightning_sinks`; `nope`: the kept layers measured without RoPE, as the hybrid's HyPE runs
  them; `general_weight`: the held-out text's log-probability beside the probes' answers in each round.
"""

from __future__ import annotations

from pathlib import Path

from .report import read_report
from .scoring import top_layers

# The built-in default model (SmolLM2-135M-Instruct) as recognised by its shape, for sources that arrive without a
# tokenizer (the GGUF default loads in memory).
_DEFAULT_SHAPE = {"num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152, "num_attention_heads": 9}


def choose_from_report(report: dict, n_sparse: int, keep_first_last: bool | None = None) -> list[int]:
    """Re-rank a saved report's layer scores for `n_sparse` layers (same tie rule as the run that wrote it). A window
    search's layers come in the order its rounds picked them: a layer's score is its gain at its own round, and a
    later round's gain can exceed an earlier one's (the layers work together), so ranking the scores could swap a
    picked layer for one the search passed over."""
    if report["method"] == "window" and report.get("window_search"):
        return _greedy_choice(report, n_sparse, keep_first_last)
    layers = sorted(report["layers"], key=lambda e: e["layer"])
    scores = [e["score"] for e in layers]
    tie = [e["loss"] for e in layers] if all(e.get("loss") is not None for e in layers) else None
    keep = report["settings"]["keep_first_last"] if keep_first_last is None else keep_first_last
    return top_layers(scores, n_sparse, keep_first_last=keep, tie_break=tie)


def _greedy_choice(report: dict, n_sparse: int, keep_first_last: bool | None) -> list[int]:
    searched = report["settings"]["keep_first_last"]
    if keep_first_last is not None and keep_first_last != searched:
        raise ValueError(f"this window search was run with keep_first_last={searched}: its rounds cannot be replayed "
                         f"with {keep_first_last}; score again with that setting")
    order = [r["layer"] for r in report["window_search"]["rounds"]]
    if n_sparse <= len(order):
        return sorted(order[:n_sparse])
    # more layers than the search picked: the rest by their gains in its last round
    scores = {e["layer"]: e["score"] for e in report["layers"]}
    rest = sorted((i for i in scores if i not in order), key=lambda i: (-scores[i], i))
    return sorted(order + rest[: n_sparse - len(order)])


def _tokenizer_for(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    where = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if where and Path(where).is_dir() and any(Path(where).glob("tokenizer*")):
        return AutoTokenizer.from_pretrained(where)
    if all(getattr(model.config, k, None) == v for k, v in _DEFAULT_SHAPE.items()):
        from ..convert.default_model import default_gguf_path

        path = default_gguf_path()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    raise ValueError("scoring layers needs the source's tokenizer: run `hybridize score SOURCE` and pass its "
                     "report.json as the score report, or give the tokenizer")


def _run_or_read(method: str, model, n_sparse: int, *, score_report=None, tokenizer=None, score_settings=None,
                 keep_first_last=None, progress: bool = True, cache_dir=None, log=print, **options) -> list[int]:
    if score_report is not None:
        report = read_report(score_report)
        if report["method"] != method:
            raise ValueError(f"{score_report} holds {report['method']} scores, not {method}: score with "
                             f"`hybridize score --method {method}`")
        if report["num_layers"] != model.config.num_hidden_layers:
            raise ValueError(f"{score_report} scores {report['num_layers']} layers but the model has "
                             f"{model.config.num_hidden_layers}: it was written for another model")
        return choose_from_report(report, n_sparse, keep_first_last)
    if score_settings is None:  # the device's default settings: scored once per model and kept (select.cache)
        from .cache import cached_report

        path = cached_report(model, method, lambda: _tokenizer_for(model, tokenizer), options=options,
                             cache_dir=cache_dir, progress=progress, log=log)
        return choose_from_report(read_report(path), n_sparse, keep_first_last)
    import dataclasses

    from .api import score_model

    settings = dataclasses.replace(score_settings, method=method, **options)
    result = score_model(model, _tokenizer_for(model, tokenizer), settings, progress=progress)
    return choose_from_report(result.report, n_sparse, keep_first_last)


def sala(model, n_sparse: int, **kw) -> list[int]:
    """SALA/HALO: aligned Lightning students swapped in one layer at a time, scored by retrieval lost per general
    ability lost (docs/design.md §3.3). Slow: minutes on a CPU for a 135M model."""
    return _run_or_read("sala", model, n_sparse, **_known(kw))


def block_influence(model, n_sparse: int, **kw) -> list[int]:
    """Cheap proxy: the layers that change the residual stream most (1 - cos(in, out)) stay attention."""
    return _run_or_read("block_influence", model, n_sparse, **_known(kw))


def window(model, n_sparse: int, **kw) -> list[int]:
    """The layers that retrieval needs whole when every other layer's attention is cut to a window (sinks + last
    `window` tokens, as a Lightning layer with `lightning_window` keeps it), found by a greedy search from every layer
    cut (select/window_search.py). No training: forward passes over probes longer than the window."""
    options = {k: kw[k] for k in ("window", "sinks") if kw.get(k) is not None}
    if kw.get("nope"):
        options["nope"] = True
    if kw.get("general_weight"):  # part of the cache file's name: a search by another objective never stands in
        options["general_weight"] = float(kw["general_weight"])
    return _run_or_read("window", model, n_sparse, **_known(kw), **options)


def window_cut(lightning_window: int, lightning_sinks: int, hype: bool = False) -> dict:
    """The window method's options for a hybrid: its own window when it has one (else the method's default), and its
    kept layers measured as they will run: without RoPE under HyPE. (SmolLM2-135M on a CPU: the layers searched that
    way give the untrained HyPE hybrid's pass-key answer its first token at -1.39 nats on average over ten probes at
    1K-2K, against -4.34 for the GPU's RoPE search's layers; bench/results/retention.md, nineteenth session.)"""
    cut = {"window": lightning_window, "sinks": lightning_sinks} if lightning_window else {}
    return {**cut, "nope": True} if hype else cut


def _known(kw: dict) -> dict:
    names = ("score_report", "tokenizer", "score_settings", "keep_first_last", "progress", "cache_dir", "log")
    return {k: v for k, v in kw.items() if k in names}
