"""Layer scores computed once per model and method and kept on disk, so that `convert` and `train` place the sparse
layers by a scoring method without paying for it twice."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

def default_cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDIZE_CACHE") or Path.home() / ".cache" / "hybridize")


@torch.no_grad()
def weights_key(model) -> str:
    """A fingerprint of a model's weights: shape-defining config fields plus exact sums of every 16th tensor, taken in
    bfloat16 so that the same checkpoint held in float32 or bfloat16 gives the same key. A fine-tune changes it unless
    it left every sampled tensor as it was (a narrow adapter merge could): give a score report to be explicit."""
    cfg = model.config
    shape = {k: getattr(cfg, k, None) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode())
    named = list(model.named_parameters())
    for name, p in named[:: max(1, len(named) // 16)]:
        q = p.detach().to(torch.bfloat16).double()
        h.update(f"{name}:{tuple(p.shape)}:{q.sum().item():.8e}:{q.abs().sum().item():.8e}".encode())
    return h.hexdigest()[:20]


def cached_report(model, method: str, get_tokenizer, *, options: dict | None = None,
                  cache_dir: str | Path | None = None, progress: bool = True, log=print) -> Path:
    """The path of `method`'s score report for `model`: one cached earlier, or a fresh one (scored on the GPU when
    there is one, with that device's default settings and `options`, ScoreSettings fields such as the window's size)
    written into `cache_dir`/scores. `get_tokenizer()` gives the source's tokenizer, called only when scoring runs."""
    from .api import ScoreSettings, score_model
    from .report import write_json

    options = dict(options or {})
    tag = "".join(f"-{k}" if v is True else f"-{k}{v}" for k, v in sorted(options.items()))
    key = weights_key(model)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    on_gpu = torch.cuda.is_available()
    # A CPU scores with smaller settings (fewer probes and steps) and can choose other layers. A report scored on a
    # GPU serves a CPU too; one scored on a CPU (named "-cpu-") serves only CPUs, so a GPU never takes it for its own.
    gpu_path, cpu_path = (cache / "scores" / f"{method}{tag}{d}-{key}.json" for d in ("", "-cpu"))
    for found in (gpu_path,) if on_gpu else (gpu_path, cpu_path):
        if found.is_file():
            log(f"layer scores ({method}): {found}")
            return found
    path = gpu_path if on_gpu else cpu_path
    settings = ScoreSettings.defaults(method, on_gpu, **options)
    log(f"scoring layers ({method}) once, on the {'GPU' if on_gpu else 'CPU'}; kept in {path} (--select uniform "
        "skips scoring)")
    device = next(model.parameters()).device
    if on_gpu:
        model.to("cuda")
    try:
        result = score_model(model, get_tokenizer(), settings, progress=progress)
    finally:
        model.to(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_json(result.report, tmp)
    os.replace(tmp, path)
    return path


__all__ = ["cached_report", "default_cache_dir", "weights_key"]
