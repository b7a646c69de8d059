"""`hybridize score`: sweep the layers, score them and choose the sparse ones (docs/design.md §3.3).

Methods: `sala` aligns a Lightning student per layer and scores retrieval lost per general ability lost with it
swapped in; `window` cuts every layer's attention to its first `sinks` and last `window` tokens (what a Lightning
layer with `lightning_window` keeps of it) and gives full attention back, layer by layer, to those that retrieval
needs (select/window_search.py); `block_influence` needs no swap.

Library entry points: `score_model(model, tokenizer, settings)` for an in-memory transformers model, and
`score(source, output, settings)` which reads a checkpoint and writes the report folder
(report.json, scores.png, students.safetensors).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..arch.configuration_hybridize import LIGHTNING, SPARSE
from ..common import parse_dtype
from ..convert.build import build_hybrid
from .alignment import AlignResult, AlignSettings, align_students, init_students, save_students, students_state_dict
from .data import calibration_data, text_source
from .placement import parse_ratio, sparse_count, uniform_layers
from .probes import ProbeSettings, build_probes
from .proxies import block_influence
from .report import CHART_NAME, REPORT_NAME, STUDENTS_NAME, write_chart, write_json
from .runner import LayerRunner, has_qk_norm, reference_hybrid
from .scoring import SCORE_CAP, SCORE_EPS, sala_scores, top_layers
from .sweep import Sweep
from .window_search import greedy_window_choice, nope_attention, window_cuts

METHODS = ("sala", "block_influence", "window")


@dataclass
class ScoreSettings:
    """Everything that decides a score run. Defaults suit a CPU; `ScoreSettings.for_gpu()` is larger."""

    method: str = "sala"
    ratio: str = "1:3"
    keep_first_last: bool = True
    seed: int = 0
    seq_len: int = 256  # alignment sequence length
    align: AlignSettings = field(default_factory=AlignSettings)
    heldout_seqs: int = 4  # general-ability probe
    heldout_seq_len: int = 256
    compare_seqs: int = 8  # --compare-uniform evaluation text (never used for choosing)
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    text: str | None = None  # None: Shakespeare corpus (else the teacher's text); "teacher"; a .txt file or folder
    gates: bool = True  # students carry the output gate (as convert's default hybrid does)
    compare_uniform: bool = False
    window: int = 256  # the window method's cut: the last `window` tokens and the first `sinks`
    sinks: int = 4
    # the window method: the layers it keeps whole are measured without RoPE, as a HyPE hybrid runs its sparse layers
    nope: bool = False
    # the window method: each round's objective adds this times the held-out text's next-token log-probability to the
    # probes' answer log-probability (both nats per token), so that layers the text needs beyond the window count too
    general_weight: float = 0.0

    @classmethod
    def for_gpu(cls, **overrides) -> "ScoreSettings":
        base = cls(seq_len=512, align=AlignSettings(steps=200, batch_size=8), heldout_seqs=16, heldout_seq_len=512,
                   compare_seqs=32, probes=ProbeSettings(passkey_lengths=(512, 2048, 4096), kv_lengths=(512, 2048),
                                                         samples_per_length=8))
        return dataclasses.replace(base, **overrides)

    @classmethod
    def defaults(cls, method: str, gpu: bool, **overrides) -> "ScoreSettings":
        """The settings a method runs with by default on this kind of device. The window method's probes and held-out
        text are long enough that most answers and tokens lie beyond a 256-token window; on a CPU two pass-key probes
        (each search step is a forward pass over every probe: 3.6 s for SmolLM2-135M on 2 cores, about 200 steps)."""
        base = cls.for_gpu() if gpu else cls()
        if method == "window":
            probes = (ProbeSettings(passkey_lengths=(1024, 2048, 4096), kv_lengths=(1024, 2048), samples_per_length=8)
                      if gpu else ProbeSettings(passkey_lengths=(1024,), kv_lengths=(), samples_per_length=2))
            # held-out text mostly past the window, for general_weight (2 x 1024 tokens: as many as the CPU's probes)
            text = dict(heldout_seqs=8, heldout_seq_len=2048) if gpu else dict(heldout_seqs=2, heldout_seq_len=1024)
            base = dataclasses.replace(base, probes=probes, **text)
        return dataclasses.replace(base, method=method, **overrides)

    def validate(self, num_layers: int | None = None, max_length: int | None = None) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        parse_ratio(self.ratio)
        for name in ("seq_len", "heldout_seqs", "heldout_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2 or self.heldout_seq_len < 2:
            raise ValueError("seq_len and heldout_seq_len must be at least 2 tokens")
        self.align.validate()
        self.probes.validate(max_length)
        if num_layers is not None and num_layers < 1:
            raise ValueError("the model has no layers")
        if self.general_weight < 0:
            raise ValueError(f"general_weight must be at least 0, got {self.general_weight}")
        if self.method == "window" and self.general_weight and self.heldout_seq_len <= self.window + self.sinks:
            raise ValueError(f"heldout_seq_len ({self.heldout_seq_len}) must exceed the window and its sinks "
                             f"({self.window} + {self.sinks}) for general_weight to measure anything the cut loses")
        if self.window < 1 or self.sinks < 0:
            raise ValueError(f"window must be at least 1 and sinks at least 0, got {self.window} and {self.sinks}")
        if self.method == "window":
            short = [n for n in self.probes.passkey_lengths + self.probes.kv_lengths if n < 2 * self.window]
            if short:
                raise ValueError(f"probe lengths {short} are under twice the window ({self.window}): their answers "
                                 "would lie inside it; give longer --passkey-lengths/--kv-lengths or a smaller --window")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ScoreResult:
    report: dict
    students: torch.nn.ModuleList | None
    align: AlignResult | None


FORMULAS = {
    "sala": f"score_i = min({SCORE_CAP:g}, (max_j R_j - R_i) / (max_j C_j - C_i + {SCORE_EPS:g})), C = -loss",
    "block_influence": "block influence: mean over tokens of 1 - cos(layer input, layer output)",
    "window": "greedy from every layer cut to its window: each round gives full attention back to the layer that "
              "raises the probes' answer log-probability (plus general_weight x the held-out text's) most; score_i = "
              "that gain at the round that picked i (unpicked layers: at the last round)",
}


def _max_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token loss (nats/token) of a causal LM on (N, T) token chunks."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in ids.split(batch):
        chunk = chunk.to(device)
        logits = model(chunk, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


def hybrid_with_students(source_model, sparse_layers: list[int], student_tensors: dict[str, torch.Tensor], *,
                         hype: bool, gates: bool = True):
    """The converted hybrid for `sparse_layers` whose Lightning layers carry the aligned students."""
    L = source_model.config.num_hidden_layers
    types = [SPARSE if i in set(sparse_layers) else LIGHTNING for i in range(L)]
    hybrid = build_hybrid(source_model, types, hype=hype, output_gates=gates, qk_norm=has_qk_norm(source_model))
    prefixes = tuple(f"model.layers.{i}.self_attn." for i, t in enumerate(types) if t == LIGHTNING)
    own = {k: v for k, v in student_tensors.items() if k.startswith(prefixes)}
    # assign, never copy in place: the hybrid's unchanged tensors share storage with the source model.
    param = next(source_model.parameters())
    own = {k: v.to(device=param.device, dtype=param.dtype) for k, v in own.items()}
    missing, unexpected = hybrid.load_state_dict(own, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"student tensors do not fit the hybrid: unexpected {unexpected[:3]}")
    return hybrid.eval()


def compare_placements(source_model, student_tensors, placements: dict[str, list[int]], eval_ids: torch.Tensor,
                       gates: bool = True) -> dict:
    """Held-out loss of each placement's hybrid (aligned students in its Lightning layers), with RoPE kept in the
    attention layers (what the sweep measures) and with HyPE's NoPE attention (convert's default, before training)."""
    out = {"teacher_loss": heldout_loss(source_model, eval_ids), "eval_tokens": int(eval_ids.numel())}
    for name, layers in placements.items():
        entry = {"layers": sorted(layers)}
        for hype in (False, True):
            model = hybrid_with_students(source_model, layers, student_tensors, hype=hype, gates=gates)
            entry["loss_nope" if hype else "loss_rope"] = heldout_loss(model, eval_ids)
            del model
        out[name] = entry
    return out


def score_model(model, tokenizer, settings: ScoreSettings | None = None, *, progress: bool = True,
                source: str = "in-memory model") -> ScoreResult:
    """Score every layer of a Llama-family transformers causal LM and choose the sparse ones."""
    settings = settings or ScoreSettings()
    L = model.config.num_hidden_layers
    settings.validate(L, _max_length(model))
    started = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(settings.seed)
    n_sparse = sparse_count(L, settings.ratio)

    t = time.perf_counter()
    need_align = settings.method == "sala"
    need_probes = settings.method in ("sala", "window")
    train_seqs = settings.align.steps * settings.align.batch_size if need_align else 0
    heldout_seqs = settings.heldout_seqs + (settings.compare_seqs if settings.compare_uniform else 0)
    # a single text is split 80/20 (alignment / held out): enough tokens for both parts
    tokens = int(max(train_seqs * settings.seq_len / 0.8, heldout_seqs * settings.heldout_seq_len / 0.2))
    data = calibration_data(
        tokenizer, train_seqs=train_seqs, heldout_seqs=heldout_seqs, seq_len=settings.seq_len,
        heldout_seq_len=settings.heldout_seq_len, seed=settings.seed,
        **text_source(settings.text, model, tokenizer, tokens, settings.seed),
    )
    probe_ids, compare_ids = data.heldout[: settings.heldout_seqs], data.heldout[settings.heldout_seqs:]
    probes = build_probes(tokenizer, settings.probes, seed=settings.seed) if need_probes else []
    runner = LayerRunner(reference_hybrid(model))
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sweep = Sweep(runner, probe_ids, probes)
    teacher = sweep.measure()
    influence = block_influence([b.states for b in sweep.heldout_batches])
    timings["teacher_s"] = time.perf_counter() - t

    students, align, measures = None, None, []
    if need_align:
        students = init_students(model, gates=settings.gates)
        align = align_students(runner, students, data.train, settings.align, progress=progress)
        timings["align_s"] = align.seconds
        t = time.perf_counter()
        measures = sweep.sweep(students, progress=progress)
        timings["sweep_s"] = time.perf_counter() - t
        timings["sweep_per_layer_s"] = timings["sweep_s"] / L
        C = [m.C for m in measures]
        R = [m.R for m in measures]
        scores = sala_scores(C, R)
        chosen = top_layers(scores, n_sparse, keep_first_last=settings.keep_first_last, tie_break=[-c for c in C])
    elif settings.method == "window":
        t = time.perf_counter()
        first_last = ([0, L - 1] if L > 1 else [0])[:n_sparse] if settings.keep_first_last else []
        search = greedy_window_choice(sweep, window_cuts(model, settings.window, settings.sinks), n_sparse,
                                      first_last, progress=progress,
                                      wholes=nope_attention(runner) if settings.nope else None,
                                      general_weight=settings.general_weight)
        timings["search_s"] = time.perf_counter() - t
        scores, chosen = search.gains, search.chosen
    else:
        scores = influence
        chosen = top_layers(scores, n_sparse, keep_first_last=settings.keep_first_last)
    forced = [i for i in ([0, L - 1] if settings.keep_first_last else []) if i in chosen]

    layers = []
    for i in range(L):
        entry = {"layer": i, "score": scores[i], "block_influence": influence[i], "sparse": i in chosen,
                 "C": None, "R": None, "loss": None, "retrieval": None}
        if measures:
            m = measures[i]
            entry.update(C=m.C, R=m.R, loss=m.loss, retrieval=m.retrieval, answer_logp=m.answer_logp)
        if align is not None:
            entry.update(align_relative_error=align.relative_error[i],
                         align_initial_relative_error=align.initial_relative_error[i],
                         align_output_scale=align.output_scale[i])
        layers.append(entry)

    report = {
        "method": settings.method,
        "source": source,
        "num_layers": L,
        "ratio": settings.ratio,
        "n_sparse": n_sparse,
        "chosen_layers": chosen,
        "forced_layers": forced,
        "uniform_layers": uniform_layers(L, n_sparse),
        "formula": FORMULAS[settings.method],
        "tie_break": "higher swapped loss first, then lower index" if measures else "lower index",
        "window_search": None if settings.method != "window" else {
            "all_cut_answer_logp": search.all_cut_logp, "rounds": search.rounds},
        "teacher": {"loss": teacher.loss, "C": teacher.C, "R": teacher.R, "retrieval": teacher.retrieval,
                    "answer_logp": teacher.answer_logp},
        "layers": layers,
        "calibration": {"source": data.source, "align_tokens": int(data.train.numel()),
                        "heldout_tokens": int(probe_ids.numel()),
                        "probe_tokens": int(sum(s.input_ids.numel() for s in probes)),
                        "probe_answers": int(sum(len(s.answer_spans) for s in probes))},
        "alignment": None if align is None else {"loss_curve": align.loss_curve, "tokens": align.tokens},
        "settings": settings.to_dict(),
        "seed": settings.seed,
        "timings": timings,
        "machine": {"device": str(runner.device), "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    if settings.compare_uniform:
        if students is None:
            raise ValueError("--compare-uniform needs aligned students: use the sala method")
        t = time.perf_counter()
        report["compare"] = compare_placements(
            model, students_state_dict(students),
            {settings.method: chosen, "uniform": uniform_layers(L, n_sparse)}, compare_ids, gates=settings.gates)
        timings["compare_s"] = time.perf_counter() - t
    report["wall_time_s"] = time.perf_counter() - started
    return ScoreResult(report, students, align)


def write_result(result: ScoreResult, output: str | Path, force: bool = False) -> Path:
    """The report folder: report.json, scores.png and (sala) students.safetensors; written atomically."""
    from ..export import atomic_folder, holds

    with atomic_folder(output, force=force, ours=holds(REPORT_NAME)) as folder:
        write_json(result.report, folder / REPORT_NAME)
        write_chart(result.report, folder / CHART_NAME)
        if result.students is not None:
            save_students(result.students, folder / STUDENTS_NAME,
                          metadata={"format": "hybridize-students", "gates": str(result.report["settings"]["gates"])})
    return Path(output)


SCORE_DTYPES = ("float32", "bfloat16")


def load_source(source: str | None, dtype: str = "float32"):
    """(model, tokenizer, label) for any source `convert` reads (None: the built-in default model)."""
    from ..convert.source import open_source, require_tokenizer

    parse_dtype(dtype, "dtype", SCORE_DTYPES)
    model, tokenizer, label = open_source(source, dtype)
    return model, require_tokenizer(tokenizer, label, "the probes need its tokenizer"), label


def score(source: str | None = None, output: str | Path = "layer-scores", settings: ScoreSettings | None = None, *,
          force: bool = False, progress: bool = True, dtype: str = "float32") -> ScoreResult:
    """Read `source` (None: the built-in SmolLM2-135M), score its layers and write the report folder.
    `dtype` bfloat16 halves memory (teacher, students and the sweep's stored streams) for large models on a GPU."""
    from ..export import check_output, holds

    # every refusal before minutes of scoring (atomic_folder checks again when it writes)
    output = check_output(output, force=force, ours=holds(REPORT_NAME), inputs=[source])
    (settings or ScoreSettings()).validate()  # cheap checks before reading the model
    parse_dtype(dtype, "dtype", SCORE_DTYPES)
    started = time.perf_counter()
    model, tokenizer, label = load_source(source, dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    load_s = time.perf_counter() - started
    result = score_model(model, tokenizer, settings, progress=progress, source=label)
    result.report["timings"]["load_s"] = load_s
    result.report["wall_time_s"] = time.perf_counter() - started
    write_result(result, output, force=force)
    return result
