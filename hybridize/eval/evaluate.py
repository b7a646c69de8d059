"""`hybridize eval` and `hybridize bench` as library calls: run the measurements, write JSON, tables and plots."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from ..export import atomic_folder, holds
from .loading import LoadedModel, load_model, pick_device
from .perplexity import perplexity
from .prefill import DEFAULT_CHUNK, generate
from .report import BENCH_JSON, EVAL_JSON, write_bench_report, write_eval_report
from .retrieval import passkey_retrieval
from .speed import run_bench, selection_variant, shape_builders

DEFAULT_PROMPTS = ("The capital of France is", "Once upon a time,")


@dataclass
class EvalSettings:
    texts: tuple[str, ...] = ("shakespeare",)
    seq_len: int = 512
    max_windows: int | None = 8
    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 1
    choices: int = 10
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 24
    chunk_size: int = DEFAULT_CHUNK
    retrieval: bool = True
    progress: bool = False

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.trials < 1:
            raise ValueError(f"trials must be at least 1, got {self.trials}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"depths must lie in [0, 1], got {bad}")


def evaluate_model(loaded: LoadedModel, settings: EvalSettings) -> dict:
    """Perplexity on each text, pass-key retrieval and generation samples for one model."""
    model, tok = loaded.model, loaded.tokenizer
    out: dict = {"kind": loaded.kind, "params": sum(p.numel() for p in model.parameters())}
    out["perplexity"] = [
        perplexity(model, tok, t, settings.seq_len, max_windows=settings.max_windows, chunk_size=settings.chunk_size,
                   progress=settings.progress).to_dict()
        for t in settings.texts
    ]
    if settings.retrieval:
        out["retrieval"] = passkey_retrieval(
            model, tok, settings.lengths, settings.depths, trials=settings.trials, choices=settings.choices,
            chunk_size=settings.chunk_size, progress=settings.progress,
        ).to_dict()
    samples = []
    device = next(model.parameters()).device
    for prompt in settings.prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
        new = generate(model, ids, settings.max_new_tokens, chunk_size=settings.chunk_size,
                       eos_token_id=getattr(tok, "eos_token_id", None))
        samples.append({"prompt": prompt, "completion": tok.decode(new[0], skip_special_tokens=True)})
    out["samples"] = samples
    return out


def evaluate(models: dict[str, LoadedModel] | list[LoadedModel], settings: EvalSettings | None = None) -> dict:
    """Evaluate already-loaded models (the hybrid first); returns {"settings": ..., "models": {name: results}}."""
    settings = settings or EvalSettings()
    if isinstance(models, list):
        models = {m.name: m for m in models}
    return {"settings": _settings_dict(settings),
            "models": {name: evaluate_model(m, settings) for name, m in models.items()}}


def _settings_dict(s: EvalSettings) -> dict:
    from dataclasses import asdict

    return asdict(s)


def _unique_names(specs: list[str]) -> list[str]:
    names = []
    for s in specs:
        base = "source (SmolLM2-135M)" if s == "default" else Path(s.rstrip("/")).name or s
        name, i = base, 2
        while name in names:
            name, i = f"{base} ({i})", i + 1
        names.append(name)
    return names


def default_output(model: str, what: str) -> Path:
    path = Path(model)
    return path / what if path.is_dir() else Path(f"{what}-results")


def run_eval(model: str, compare: str | None = None, *, output: str | Path | None = None, force: bool = False,
             dtype: str | None = None, device: str | None = None, settings: EvalSettings | None = None,
             trust_remote_code: bool = False):
    """Load MODEL (and COMPARE) one at a time, evaluate, write eval_results.json/.md and the heat map into `output`.
    Returns (results, {kind: path}). `trust_remote_code`: let non-hybrid folders run the Python files they ship."""
    settings = settings or EvalSettings()
    pick_device(device)
    specs = [model] + ([compare] if compare else [])
    names = _unique_names(specs)
    output = Path(output) if output is not None else default_output(model, "eval")
    results = {"settings": _settings_dict(settings), "models": {}}
    with atomic_folder(output, force=force, ours=holds(EVAL_JSON), inputs=specs) as tmp:
        for spec, name in zip(specs, names):
            loaded = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            if loaded.tokenizer is None:
                raise ValueError(f"{spec} has no tokenizer, which eval needs to read its texts: copy the source "
                                 "model's tokenizer files (tokenizer.json, tokenizer_config.json) into it")
            loaded.name = name
            results["models"][name] = evaluate_model(loaded, settings)
            del loaded
            gc.collect()
        paths = write_eval_report(results, tmp)
    return results, {k: output / p.name for k, p in paths.items()}


def run_bench_command(model: str | None = None, compare: str | None = None, *, shape: str | None = None,
                      ratio: str = "1:3", lengths=(1024, 2048, 4096), output: str | Path | None = None,
                      force: bool = False, dtype: str | None = None, device: str | None = None,
                      chunk_size: int = DEFAULT_CHUNK, decode_batches=(1,), decode_steps: int = 16,
                      time_cap_s: float | None = None, warmup_length: int | None = None, plots: bool = True,
                      sparse_selection: str | None = None, normalizer: str | None = None, command: str = "", log=print,
                      trust_remote_code: bool = False):
    """Benchmark MODEL (and COMPARE), or a weightless --shape and its hybrid. Returns (report dict, paths).
    `trust_remote_code`: let non-hybrid folders run the Python files they ship."""
    from .loading import parse_dtype

    if model is not None and shape is not None:
        raise ValueError("give a MODEL folder or --shape (e.g. --shape llama3-8b), not both")
    if model is None and shape is None:
        raise ValueError("give a MODEL folder to benchmark, or --shape (e.g. --shape llama3-8b) for a weightless "
                         "model and its hybrid")
    bad = [b for b in decode_batches if b < 1]
    if bad or decode_steps < 1:
        raise ValueError(f"--decode-batch sizes and --decode-steps must be at least 1, got "
                         f"{bad[0] if bad else decode_steps}")
    dev = pick_device(device)
    dtype_name = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    torch_dtype = parse_dtype(dtype_name)
    if shape is not None:
        builders = shape_builders(shape, ratio, torch_dtype, dev, selection_variant(sparse_selection, normalizer))
    else:
        specs = [model] + ([compare] if compare else [])
        builders = {}
        for spec, name in zip(specs, _unique_names(specs)):
            builders[name] = (lambda s=spec: load_model(s, dtype=torch_dtype, device=str(dev),
                                                        trust_remote_code=trust_remote_code).model)
    output = Path(output) if output is not None else default_output(model or f"{shape}", "bench")
    inputs = [model, compare] if shape is None else []
    with atomic_folder(output, force=force, ours=holds(BENCH_JSON), inputs=inputs) as tmp:
        report = run_bench(builders, list(lengths), device=dev, dtype=dtype_name, chunk_size=chunk_size,
                           decode_batches=tuple(decode_batches), decode_steps=decode_steps, time_cap_s=time_cap_s,
                           warmup_length=warmup_length, command=command, log=log).to_dict()
        paths = write_bench_report(report, tmp, plots=plots)
    return report, {k: output / p.name for k, p in paths.items()}


__all__ = ["EvalSettings", "evaluate", "evaluate_model", "run_bench_command", "run_eval"]
