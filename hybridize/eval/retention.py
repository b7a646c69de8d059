"""The retention report: does a converted model still know what its source knew, and does it read further?

Every model is measured beside a reference (the dense source) on

- perplexity on held-out text (heldout.py: news, wiki, Python docs) and on the fit text (shakespeare) at several
  window lengths, with the ratio to the reference;
- NLL by position over long windows (position_nll): does the context keep helping as it grows;
- retrieval (retrieval.py: passkey, multikey, kv) over context lengths and needle depths: greedy exact match and the
  likelihood choice among `choices` answers;
- behaviour and knowledge: next-token top-1 agreement and KL(reference || model) on held-out text, and a fixed set of
  factual prompts (probes.py) scored by greedy completion; the retention measure is the accuracy on the prompts that
  the reference answers correctly;
- optionally lm-evaluation-harness tasks when `lm_eval` is installed.

All models stay in memory (the agreement runs the reference and each model on the same windows). Every measurement
goes through the chunked prefill, and RetentionSettings caps all of them.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .heldout import FIT_SOURCES, HELDOUT_SOURCES, ngram_overlap, read_documents, source_role
from .loading import LoadedModel
from .perplexity import perplexity_of_ids, position_edges, position_nll
from .prefill import DEFAULT_CHUNK, generate, prefill, use_chunked_sdpa
from .probes import PROBES
from .report import RETENTION_JSON, write_retention_report
from .retrieval import TASKS, run_retrieval

CHARS_PER_TOKEN = 6  # generous for English BPE (~4): read this many characters per wanted token, then cut


@dataclass
class RetentionSettings:
    # perplexity: each source (heldout.read_documents names, or paths) at each window length
    sources: tuple[str, ...] = ("wiki", "news", "pydoc", "shakespeare")
    windows: tuple[int, ...] = (512, 2048, 8192)
    max_windows: int = 4  # per source and window length
    max_tokens: int = 65536  # tokens read per source (caps every text measurement)
    # NLL by position: windows of position_len tokens, buckets 0, first, 2*first, ... position_len
    position_sources: tuple[str, ...] = ("wiki", "news")
    position_len: int = 32768
    position_windows: int = 2
    position_first: int = 512
    # retrieval
    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    trials: int = 3  # probes per length x depth cell
    choices: int = 10
    needles: int = 4  # multikey / kv
    digits: int = 5
    # behaviour: agreement with the reference, factual probes
    agreement_sources: tuple[str, ...] = ("wiki", "news")
    agreement_tokens: int = 8192  # per source
    agreement_len: int = 1024  # window
    probes: bool = True
    probe_tokens: int = 6  # greedy tokens per probe
    # lm-evaluation-harness (optional)
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include_path: str | None = None
    lm_eval_limit: int | None = None
    # held-out check: n-gram overlap of each held-out source with these training texts (() skips it)
    overlap_with: tuple[str, ...] = FIT_SOURCES
    data_dir: str | None = None  # folder with gensim's two data files (heldout.gensim_file)
    chunk_size: int = DEFAULT_CHUNK
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        for f in fields(self):  # lists from JSON or a caller become tuples (hashable, JSON-stable)
            if isinstance(getattr(self, f.name), list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        positive = ["max_windows", "max_tokens", "position_windows", "position_first", "trials", "needles", "digits",
                    "agreement_tokens", "probe_tokens", "chunk_size"]
        bad = [n for n in positive if getattr(self, n) < 1]
        if bad:
            raise ValueError(f"{bad[0]} must be at least 1, got {getattr(self, bad[0])}")
        for name in ("windows", "lengths"):
            if any(int(x) < 2 for x in getattr(self, name)):
                raise ValueError(f"{name} must be at least 2 tokens, got {getattr(self, name)}")
        if self.position_len < 2 or self.agreement_len < 2:
            raise ValueError("position_len and agreement_len must be at least 2 tokens")
        if self.choices < 2:
            raise ValueError(f"choices must be at least 2, got {self.choices}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1], got {self.depths}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown retrieval task {unknown[0]!r}: choose from {', '.join(TASKS)}")

    @classmethod
    def quick(cls, **overrides) -> "RetentionSettings":
        """Tiny lengths and counts for CPU tests and smoke runs (minutes become seconds)."""
        base = dict(windows=(32, 64), max_windows=2, max_tokens=2048, position_sources=("news",), position_len=128,
                    position_windows=1, position_first=16, lengths=(160, 256), depths=(0.5,), trials=1,
                    agreement_sources=("news",), agreement_tokens=128, agreement_len=64, probe_tokens=3,
                    overlap_with=())
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------------
class SourceTexts:
    """Documents of each source read once, token ids once per (tokenizer, source)."""

    def __init__(self, settings: RetentionSettings):
        self.settings = settings
        self._docs: dict[str, list[str]] = {}
        self._ids: dict[tuple[int, str], torch.Tensor] = {}

    def documents(self, source: str) -> list[str]:
        if source not in self._docs:
            chars = self.settings.max_tokens * CHARS_PER_TOKEN
            self._docs[source] = read_documents(source, data_dir=self.settings.data_dir, max_chars=chars)
        return self._docs[source]

    def ids(self, tokenizer, source: str) -> torch.Tensor:
        key = (id(tokenizer), source)
        if key not in self._ids:
            text = "\n\n".join(self.documents(source))[: self.settings.max_tokens * CHARS_PER_TOKEN]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: self.settings.max_tokens]
            self._ids[key] = torch.tensor(ids, dtype=torch.long)
        return self._ids[key]


# ---------------------------------------------------------------------------------------------------------------------
# Agreement with the reference
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _window_logprobs(model, window: torch.Tensor, chunk_size: int) -> torch.Tensor:
    parts = []

    def keep(logits, start, stop):
        parts.append(torch.log_softmax(logits[0].float(), -1))

    prefill(model, window, chunk_size, on_chunk=keep)
    return torch.cat(parts)  # (T, V)


@torch.no_grad()
def next_token_agreement(reference, models: dict, ids: torch.Tensor, window_len: int, *,
                         max_windows: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> dict[str, dict]:
    """Top-1 agreement and mean KL(reference || model) of the next-token distributions at every position of
    non-overlapping windows of the 1-D `ids`. Window by window: the reference runs once per window and only one
    window's distributions are held. Returns {name: {"top1", "kl", "tokens"}}."""
    n = ids.numel() // window_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window_len}")
    n = min(n, max_windows) if max_windows is not None else n
    device = next(reference.parameters()).device
    top1 = {k: 0.0 for k in models}
    kl = {k: 0.0 for k in models}
    count = 0
    for w in range(n):
        window = ids[w * window_len : (w + 1) * window_len].view(1, -1).to(device)
        ref = _window_logprobs(reference, window, chunk_size)
        p_ref = ref.exp()
        for name, model in models.items():
            lp = _window_logprobs(model, window.to(next(model.parameters()).device), chunk_size).to(ref.device)
            v = min(lp.shape[-1], ref.shape[-1])  # padded vocabularies: compare the shared ids
            top1[name] += float((lp[:, :v].argmax(-1) == ref[:, :v].argmax(-1)).sum())
            kl[name] += float((p_ref[:, :v] * (ref[:, :v] - lp[:, :v])).sum(-1).clamp_min(0).sum())
        count += window.shape[1]
    return {k: {"top1": top1[k] / count, "kl": kl[k] / count, "tokens": count} for k in models}


# ---------------------------------------------------------------------------------------------------------------------
# Factual probes
# ---------------------------------------------------------------------------------------------------------------------
_QUOTES = " \t\r\n\"'“”‘’*"


def probe_correct(completion: str, answers) -> bool:
    """The completion starts with one of the answers (case-insensitive, surrounding spaces and quotes stripped), and the
    answer ends there as a word ("1" does not match "10")."""
    text = completion.strip(_QUOTES).lower()
    for a in answers:
        a = a.strip().lower()
        if text.startswith(a) and (len(text) == len(a) or not text[len(a)].isalnum()):
            return True
    return False


_FUNCTION_WORDS = frozenset("a an the of is are was were in on at to for and or by as it its this that".split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def probe_echo(prompt: str, completion: str) -> bool:
    """The completion repeats its prompt instead of answering: its first content word (function words skipped, among
    its first four words) is one of the prompt's ("The opposite of up is" -> " the opposite of up"). Trained hybrids
    did this on 15-20 of the 100 probes and in most of their misses, the source on 5 (bench/results/retention.md,
    twelfth session)."""
    content = [w for w in _words(completion)[:4] if w not in _FUNCTION_WORDS]
    return bool(content) and content[0] in set(_words(prompt)) - _FUNCTION_WORDS


@torch.no_grad()
def probe_completions(model, tokenizer, prompts, max_new_tokens: int = 6, chunk_size: int = DEFAULT_CHUNK) -> list[str]:
    """Greedy completions of `prompts`; prompts of the same token length run as one batch (no padding needed)."""
    device = next(model.parameters()).device
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    for idx in by_len.values():
        batch = torch.tensor([encoded[i] for i in idx], device=device)
        new = generate(model, batch, max_new_tokens, chunk_size=chunk_size,
                       eos_token_id=getattr(tokenizer, "eos_token_id", None))
        for i, row in zip(idx, new.tolist()):
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def score_probes(completions: list[str], probes=PROBES, reference_correct: list[bool] | None = None) -> dict:
    """Accuracy of `completions` (one per probe), overall, per category, and on the probes the reference got right;
    `echoed`: how many repeat their prompt instead of answering (probe_echo)."""
    correct = [probe_correct(c, p[2]) for c, p in zip(completions, probes)]
    out = {"accuracy": sum(correct) / len(correct), "correct": sum(correct), "total": len(correct)}
    cats: dict[str, list[bool]] = {}
    for ok, p in zip(correct, probes):
        cats.setdefault(p[0], []).append(ok)
    out["by_category"] = {c: {"accuracy": sum(v) / len(v), "total": len(v)} for c, v in cats.items()}
    if reference_correct is not None:
        kept = [ok for ok, ref in zip(correct, reference_correct) if ref]
        out["retained_correct"], out["retained_total"] = sum(kept), len(kept)
        out["retained_accuracy"] = sum(kept) / len(kept) if kept else None
    echo = [probe_echo(p[1], c) for c, p in zip(completions, probes)]
    out["echoed"] = sum(echo)
    out["items"] = [{"prompt": p[1], "completion": c, "correct": ok, "echo": e}
                    for p, c, ok, e in zip(probes, completions, correct, echo)]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional)
# ---------------------------------------------------------------------------------------------------------------------
def run_lm_eval(loaded: LoadedModel, tasks, include_path: str | None = None, limit: int | None = None) -> dict:
    """`tasks` of lm-evaluation-harness on the in-memory model, offline (task files from `include_path`, datasets
    from local files or the cache). {"skipped": why} without `lm_eval`."""
    if importlib.util.find_spec("lm_eval") is None:
        return {"skipped": "lm_eval is not installed (pip install lm-eval)"}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with _env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"):  # a task that needs the network fails instead of waiting
        res = simple_evaluate(model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1),
                              tasks=list(tasks), task_manager=TaskManager(include_path=include_path), limit=limit)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in res["results"].items()}


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def chunked_attention(models):
    """Dense transformers models use the lower-right causal SDPA for chunks after a cache while the report runs (no
    (chunk, context) mask at 64K); their attention implementation is restored afterwards."""
    changed = []
    for m in models:
        before = getattr(m.config, "_attn_implementation", None)
        try:
            if use_chunked_sdpa(m):
                changed.append((m, before))
        except ValueError:  # a model without SDPA support keeps its own attention
            pass
    try:
        yield
    finally:
        for m, before in changed:
            m.set_attn_implementation(before)


@contextlib.contextmanager
def _timed(seconds: dict, key: str):
    """Wall time of a section into seconds[key] (the report's runtime budget is checked from these)."""
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - start, 3)


def _perplexities(loaded: LoadedModel, settings: RetentionSettings, texts: SourceTexts, notes: list) -> dict:
    out: dict[str, dict] = {}
    for source in settings.sources:
        ids = texts.ids(loaded.tokenizer, source)
        out[source] = {}
        for w in settings.windows:
            if ids.numel() < w:
                notes.append(f"{loaded.name}: {source} has {ids.numel()} tokens, fewer than one {w}-token window")
                continue
            r = perplexity_of_ids(loaded.model, ids, w, chunk_size=settings.chunk_size,
                                  max_windows=settings.max_windows, source=source)
            out[source][str(w)] = {"perplexity": r.perplexity, "nll": r.nll, "windows": r.windows, "tokens": r.tokens}
    return out


def _positions(loaded: LoadedModel, settings: RetentionSettings, texts: SourceTexts, notes: list) -> dict:
    out = {}
    edges = position_edges(settings.position_len, settings.position_first)
    for source in settings.position_sources:
        ids = texts.ids(loaded.tokenizer, source)
        if ids.numel() < settings.position_len:
            notes.append(f"{loaded.name}: {source} has {ids.numel()} tokens, fewer than one {settings.position_len}"
                         f"-token position window (raise max_tokens)")
            continue
        out[source] = position_nll(loaded.model, ids, settings.position_len, edges,
                                   max_windows=settings.position_windows, chunk_size=settings.chunk_size,
                                   source=source).to_dict()
    return out


def _retrieval(loaded: LoadedModel, settings: RetentionSettings) -> dict:
    out = {}
    for task in settings.tasks:
        r = run_retrieval(loaded.model, loaded.tokenizer, task, settings.lengths, settings.depths,
                          trials=settings.trials, digits=settings.digits, choices=settings.choices,
                          needles=settings.needles, seed=settings.seed, chunk_size=settings.chunk_size,
                          progress=settings.progress).to_dict()
        per = len(r["depths"]) * r["trials"]
        r["by_length"] = {str(L): {"accuracy": sum(r["grid"][i]) / len(r["depths"]),
                                   "choice_accuracy": sum(r["choice_grid"][i]) / len(r["depths"]), "n": per,
                                   "first_token_misses": r["first_token_misses"][i]}
                          for i, L in enumerate(r["lengths"])}
        out[task] = r
    return out


def _same_tokens(a, b, text: str) -> bool:
    return a is b or list(a(text)["input_ids"]) == list(b(text)["input_ids"])


def retention_report(models: dict[str, LoadedModel], settings: RetentionSettings | None = None, *,
                     reference: str, log=None, on_model=None, measured: dict | None = None) -> dict:
    """Measure every model of `models` ({name: LoadedModel}, all in memory, with tokenizers) beside
    `models[reference]`. Returns a JSON-serialisable dict: settings, reference, sources (their roles), overlap (held-out
    n-gram overlap with the training texts), models ({name: measurements, with ratios to the reference}), notes.
    `log`: called with a line after each model's measurements (a long report shows where it is); `on_model`: called
    with the results so far after each model (a caller can keep them if the run is cut short). `measured`: an earlier
    report (same settings, retrieval trials aside) whose measurements of the models it names are taken instead of
    measured again; those models still serve for agreement (the source measured once, each hybrid beside it)."""
    settings = settings or RetentionSettings()
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models ({', '.join(models)})")
    missing = [n for n, m in models.items() if m.tokenizer is None]
    if missing:
        raise ValueError(f"{missing[0]} has no tokenizer: the retention report needs one for every model")
    known = _reusable(measured, settings, models) if measured else {}  # checked before any work
    texts = SourceTexts(settings)
    notes: list[str] = []
    results: dict = {"settings": settings.to_dict(), "reference": reference, "notes": notes,
                     "sources": {s: source_role(s) for s in dict.fromkeys(
                         settings.sources + settings.position_sources + settings.agreement_sources)},
                     "overlap": _overlap(settings, texts), "models": {}}
    ref = models[reference]
    with chunked_attention([m.model for m in models.values()]):
        for name, loaded in models.items():
            if name in known:
                results["models"][name] = dict(known[name], reused=True)
                continue
            seconds: dict[str, float] = {}
            m: dict = {"kind": loaded.kind, "params": sum(p.numel() for p in loaded.model.parameters()),
                       "seconds": seconds}
            with _timed(seconds, "perplexity"):
                m["perplexity"] = _perplexities(loaded, settings, texts, notes)
            with _timed(seconds, "position"):
                m["position"] = _positions(loaded, settings, texts, notes)
            if settings.tasks and settings.lengths:
                with _timed(seconds, "retrieval"):
                    m["retrieval"] = _retrieval(loaded, settings)
            if settings.probes:
                with _timed(seconds, "probes"):
                    m["probes"] = probe_completions(loaded.model, loaded.tokenizer, [p[1] for p in PROBES],
                                                    settings.probe_tokens, settings.chunk_size)
            if settings.lm_eval_tasks:
                with _timed(seconds, "lm_eval"):
                    m["lm_eval"] = run_lm_eval(loaded, settings.lm_eval_tasks, settings.lm_eval_include_path,
                                               settings.lm_eval_limit)
            results["models"][name] = m
            if log is not None:
                log(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
            if on_model is not None:
                on_model(results)
            gc.collect()
        others = {n: m for n, m in models.items() if n != reference}
        results["agreement_seconds"] = {}
        for source in settings.agreement_sources:
            _agreement(source, ref, others, settings, texts, results, notes)
    if settings.probes:
        completions = {n: _completions(m["probes"]) for n, m in results["models"].items()}
        ref_correct = [probe_correct(c, p[2]) for c, p in zip(completions[reference], PROBES)]
        for n, m in results["models"].items():
            m["probes"] = score_probes(completions[n], PROBES, ref_correct)
    _add_ratios(results)
    return results


def _completions(probes) -> list[str]:
    """A model's probe completions: measured here (a list) or scored in an earlier report (a dict with items)."""
    return [it["completion"] for it in probes["items"]] if isinstance(probes, dict) else list(probes)


def _same_settings(a: dict, b: dict) -> None:
    """Two reports' settings agree except in retrieval trials (each retrieval cell keeps its own count)."""
    a, b = ({k: v for k, v in x.items() if k not in ("trials", "progress")} for x in (a, b))
    if a != b:
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(f"reports measured with different settings ({', '.join(diff)}): they cannot be combined")


def _reusable(measured: dict, settings: RetentionSettings, models: dict) -> dict:
    _same_settings(measured["settings"], json.loads(json.dumps(settings.to_dict())))
    return {n: {k: v for k, v in m.items() if k not in ("agreement", "summary", "reused")}
            for n, m in measured["models"].items() if n in models}


def merge_reports(reports: list[dict], reference: str) -> dict:
    """One report from several retention_report results taken with the same settings (the retrieval trials may
    differ: each cell keeps its own count), e.g. the source measured once and each trained hybrid in its own run.
    Ratios, position differences, probe retention and summaries are recomputed against `reference`; a model's
    agreement is kept only where its report had the same reference (agreement needs both models in one run). A model
    in several reports must be measured in at most one of them (the others took it with `measured`)."""
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    for r in reports[1:]:
        _same_settings(reports[0]["settings"], r["settings"])
    models, notes = {}, []
    for r in reports:
        for name, m in r["models"].items():
            if name in models:
                if m.get("reused"):
                    continue  # a copy of a measurement another report holds
                if not models[name].get("reused"):
                    raise ValueError(f"model {name!r} is in more than one report")
            m = dict(m)
            if r["reference"] != reference:
                m.pop("agreement", None)
            models[name] = m
        notes += [n for n in r.get("notes", []) if n not in notes]
    if reference not in models:
        raise ValueError(f"reference {reference!r} is in none of the reports ({', '.join(models)})")
    merged = {**reports[0], "reference": reference, "models": models, "notes": notes,
              "merged_from": [{"reference": r["reference"], "models": list(r["models"]),
                               "trials": r["settings"].get("trials")} for r in reports]}
    completions = {n: _completions(m["probes"]) for n, m in models.items() if "probes" in m}
    if reference in completions:
        ref_correct = [probe_correct(c, p[2]) for c, p in zip(completions[reference], PROBES)]
        for n, c in completions.items():
            models[n]["probes"] = score_probes(c, PROBES, ref_correct)
    _add_ratios(merged)
    return merged


def _agreement(source, ref: LoadedModel, others: dict, settings, texts: SourceTexts, results: dict, notes: list):
    ids = texts.ids(ref.tokenizer, source)
    sample = "\n\n".join(texts.documents(source))[:2000]
    same = {n: m for n, m in others.items() if _same_tokens(ref.tokenizer, m.tokenizer, sample)}
    for n in others.keys() - same.keys():
        notes.append(f"{n}: its tokenizer differs from the reference's: no agreement on {source}")
    if ids.numel() < settings.agreement_len:
        notes.append(f"{source} has {ids.numel()} tokens, fewer than one {settings.agreement_len}-token agreement "
                     f"window")
        return
    windows = max(1, settings.agreement_tokens // settings.agreement_len)
    start = time.perf_counter()
    got = next_token_agreement(ref.model, {n: m.model for n, m in same.items()}, ids, settings.agreement_len,
                               max_windows=windows, chunk_size=settings.chunk_size)
    results["agreement_seconds"][source] = round(time.perf_counter() - start, 3)
    for n, v in got.items():
        results["models"][n].setdefault("agreement", {})[source] = v


def _overlap(settings: RetentionSettings, texts: SourceTexts) -> dict:
    """Word 13-gram overlap of each held-out source used with each training text of `overlap_with` (0 = disjoint)."""
    used = [s for s in dict.fromkeys(settings.sources + settings.position_sources + settings.agreement_sources)
            if s in HELDOUT_SOURCES]
    out = {}
    for train in settings.overlap_with:
        train_docs = read_documents(train, data_dir=settings.data_dir)
        out[train] = {s: ngram_overlap(train_docs, texts.documents(s), max_ngrams=5000) for s in used}
    return out


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def _add_ratios(results: dict) -> None:
    """Perplexity ratios (model / reference) per source and window, NLL differences by position, and a summary."""
    ref = results["models"][results["reference"]]
    for m in results["models"].values():
        for source, per_window in m["perplexity"].items():
            for w, v in per_window.items():
                v["ratio"] = _ratio(v["perplexity"], ref["perplexity"].get(source, {}).get(w, {}).get("perplexity"))
        for source, pos in m["position"].items():
            ref_nll = ref["position"].get(source, {}).get("nll", [])
            pos["nll_minus_reference"] = [a - b if a is not None and b is not None else None
                                          for a, b in zip(pos["nll"], ref_nll)]
        m["summary"] = _summary(m, results)


def _summary(m: dict, results: dict) -> dict:
    """One number per measure: geometric-mean perplexity ratio on the held-out sources, mean retrieval accuracies,
    probe retention, mean agreement."""
    out: dict = {}
    ratios = [v["ratio"] for s, pw in m["perplexity"].items() if source_role(s) == "held-out" for v in pw.values()
              if v.get("ratio")]
    out["heldout_ppl_ratio"] = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    for task, r in m.get("retrieval", {}).items():
        out[f"{task}_accuracy"], out[f"{task}_choice_accuracy"] = r["accuracy"], r["choice_accuracy"]
    if "probes" in m:
        out["probe_accuracy"] = m["probes"]["accuracy"]
        out["probe_retained"] = m["probes"].get("retained_accuracy")
        if "echoed" in m["probes"]:
            out["probe_echo_rate"] = m["probes"]["echoed"] / m["probes"]["total"]
    if m.get("agreement"):
        vals = list(m["agreement"].values())
        out["top1_agreement"] = sum(v["top1"] for v in vals) / len(vals)
        out["kl"] = sum(v["kl"] for v in vals) / len(vals)
    return out


def run_retention(model: str, compare: str, *, output: str | Path | None = None, force: bool = False,
                  dtype: str | None = None, device: str | None = None, settings: RetentionSettings | None = None,
                  trust_remote_code: bool = False, log=None, reuse_reference: str | Path | None = None):
    """Load MODEL and COMPARE (the reference), run retention_report, write retention.json/.md and the plots into
    `output` (default MODEL/retention) atomically. `log` gets a line per model measured. `reuse_reference`: the
    retention.json of an earlier run with the same reference and settings; its measurements of the reference are
    taken, not measured again (the reference is still loaded, for agreement). Returns (results, {kind: path})."""
    from ..export import atomic_folder, holds
    from .evaluate import _unique_names, default_output
    from .loading import load_model
    if not compare:
        raise ValueError("the retention suite compares with a reference: give --compare SOURCE")
    names = _unique_names([model, compare])
    measured = reference_measurements(reuse_reference, names[1]) if reuse_reference is not None else None
    output = Path(output) if output is not None else default_output(model, "retention")
    with atomic_folder(output, force=force, ours=holds(RETENTION_JSON), inputs=[model, compare]) as tmp:
        models = {}
        for spec, name in zip([model, compare], names):
            models[name] = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            models[name].name = name
        results = retention_report(models, settings, reference=names[1], log=log, measured=measured)
        paths = write_retention_report(results, tmp)
    return results, {k: output / p.name for k, p in paths.items()}


def reference_measurements(path: str | Path, reference: str) -> dict:
    """The reference's entry of an earlier retention.json, as retention_report's `measured`. Only the reference: a
    model of the same name measured there may not be the model given now (a conversion made another way)."""
    try:
        earlier = json.loads(Path(path).read_text())
        entry = earlier["models"][earlier["reference"]]
        settings = earlier["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--reuse-reference {path}: not a retention.json written by `hybridize eval --suite "
                         f"retention` ({type(e).__name__}: {e})") from None
    if earlier["reference"] != reference:
        raise ValueError(f"--reuse-reference {path} measured the reference {earlier['reference']!r}, not "
                         f"{reference!r}: compare with the same model, or leave the option out")
    return {"settings": settings, "models": {reference: entry}}


__all__ = [
    "RetentionSettings", "chunked_attention", "next_token_agreement", "probe_completions", "probe_correct",
    "reference_measurements", "retention_report", "run_retention", "run_lm_eval", "score_probes",
    "write_retention_report",
]
