"""The training recipe: a typed, validated description of a staged run, loaded from YAML.

Every problem is reported as one line naming the file, the field (dotted path, list items as `stages[1]`) and what is
allowed, e.g. `recipe.yaml: stages[0].schedule: must be one of constant, cosine, linear, wsd, exponential; got 'cos'`.
`--set key=value` overrides (dotted paths, values parsed as YAML) are applied to the raw mapping before validation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from ..common import DTYPES


class RecipeError(ValueError):
    """A malformed recipe: one line naming file and field."""


SCHEDULES = ("constant", "cosine", "linear", "wsd", "exponential")
PRESETS = ("new", "lightning", "sparse", "all", "lora")
SOURCE_TYPES = ("text", "jsonl", "json", "parquet", "hf", "teacher")
PRECISIONS = ("fp32", "bf16")
KL_DIRECTIONS = ("forward", "reverse")
HIDDEN_LAYERS = ("all", "lightning", "sparse")
HIDDEN_INPUTS = ("end_to_end", "teacher_inputs")
HIDDEN_AT = ("layer", "mixer")
NONFINITE = ("stop", "skip")
SCORE_METHODS = ("sala", "block_influence", "window")  # hybridize.select.api.METHODS (that import loads the model code)
SELECT_METHODS = ("uniform", *SCORE_METHODS)
DTYPE_NAMES = tuple(DTYPES)


@dataclass
class ModelSpec:
    source: str | None = "default"  # "default" (built-in SmolLM2-135M) or any source `hybridize convert` reads
    converted: str | None = None  # an already converted hybrid folder (then `source` only provides the teacher)
    ratio: str = "1:3"
    layers: list[int] | None = None  # explicit sparse layer indices (overrides ratio and select)
    # how the ratio's sparse layers are placed: uniform, or a scoring method of hybridize.select (sala,
    # block_influence, window: measured with lightning_window's cut when set), scored once on the source and cached
    # in data.cache_dir (or read from score_report); unset: convert's default for the source (block_influence up to 1.5B parameters, uniform above)
    select: str | None = None
    score_report: str | None = None  # a report.json written by `hybridize score` (with select: sala|block_influence)
    hype: bool = True
    gates: bool = True
    lightning_decay: str = "sala"  # per-head decay of the Lightning layers: "sala" (same in every layer) or "layerwise"
    # Lightning K/V heads: "query" (expanded in the weights to one per query head, SALA) or "source" (the source's
    # K/V heads shared by their query heads at run time: fewer projections; the same function at conversion)
    lightning_kv_heads: str = "query"
    # softmax attention over each sequence's first `lightning_sinks` and last `lightning_window` tokens in every
    # Lightning layer, beside the recurrent state (0: none; HybridConfig)
    lightning_window: int = 0
    lightning_sinks: int = 4
    # the window branch reads a sink further back than this as if it lay this far back (None: the source's context;
    # 0: the true distance; HybridConfig)
    lightning_sink_reach: int | None = None
    # RoPE rescaled YaRN-style by this factor over the source's context in every layer (0: the source's RoPE)
    rope_yarn: float = 0.0
    sparse_query_log_scale: float | None = None  # HALO's NoPE query scaling q_t *= log(t + a) / log(a) (a, e.g. 362)
    students: str | None = None  # aligned students (safetensors keyed by hybrid parameter names), loaded strict=False
    # fit each Lightning layer's output-norm weights to its source layer's attention output (least squares on 4 x 512
    # tokens of the built-in plays) before training: a fresh Lightning layer's output is 3-30x too large
    calibrate: bool = True


@dataclass
class TeacherSpec:
    source: str | None = None  # defaults to model.source
    dtype: str = "bfloat16"
    shard: bool = False  # under FSDP: shard the teacher too (else every process holds a frozen replica)


@dataclass
class SourceSpec:
    type: str
    path: str | None = None  # text file or folder, jsonl/json/parquet file(s), or hf dataset name/path
    name: str | None = None  # hf dataset config name
    split: str = "train"
    field: str = "text"
    weight: float = 1.0
    encoding: str = "utf-8"
    glob: str = "*.txt"  # files of a folder path
    include: list[str] | None = None  # keep only file names matching one of these patterns
    exclude: list[str] = dataclasses.field(default_factory=list)  # drop file names matching one of these patterns
    heldout: bool = False  # use this source only for held-out evaluation
    max_documents: int | None = None
    # teacher-generated text
    prompts: list[str] | None = None  # None: the built-in prompts of many domains (hybridize.train.prompts)
    # start every sample from the tokenizer's begin-of-text token alone: the teacher writes documents of its own
    # pre-training kind, in proportions it chose, instead of continuations of prompts someone picked
    unprompted: bool = False
    # unprompted samples start from this token instead (e.g. the base model's document separator "<|endoftext|>"
    # where the tokenizer's begin-of-text is an instruct model's start of turn)
    start_token: str | None = None
    num_samples: int = 16
    max_new_tokens: int = 256
    # the end of text held off for this many new tokens: documents as long as the stages that read them (the teacher
    # ends most of its own near 400 tokens, and packed documents never attend across a boundary)
    min_new_tokens: int = 0
    temperature: float = 1.0
    batch_size: int = 64  # sequences sampled at once
    # cut each document where it starts to loop: at the first window of 128 tokens in which more than this share of
    # the 4-grams already occurred in the 128 positions before (hybridize.train.repetition); None keeps every token
    max_repetition: float | None = None


@dataclass
class DataSpec:
    sources: list[SourceSpec] = field(default_factory=list)
    heldout_fraction: float = 0.0  # documents of training sources kept aside for evaluation (by a seeded hash)
    cache_dir: str = ".hybridize-cache"
    append_eos: bool = True


@dataclass
class LossSpec:
    hidden_mse: float = 0.0
    kl: float = 0.0
    ce: float = 0.0
    kl_direction: str = "forward"  # forward KL(teacher || student) or reverse KL(student || teacher)
    temperature: float = 1.0
    hidden_layers: str = "all"  # which layer outputs enter the hidden MSE: all, lightning or sparse layers
    # end_to_end: the student runs on its own hidden states; teacher_inputs: every student layer is fed the teacher's
    # (detached) input to that layer, so each layer is aligned on its own (HALO's stage 1)
    hidden_inputs: str = "end_to_end"
    # what the hidden MSE compares: each decoder layer's output, or its token mixer's output alone (HALO's stage 1;
    # with teacher_inputs the frozen MLPs then add nothing and are not run)
    hidden_at: str = "layer"
    # the teacher's KL only at positions below this (counted from each segment's start); the row's later tokens train
    # on the other terms alone: a stage past the source's context keeps the teacher where its positions were trained
    kl_max_position: int | None = None


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StageSpec:
    name: str
    seq_len: int
    global_batch_tokens: int
    lr: float
    tokens: int | None = None
    steps: int | None = None
    micro_batch_size: int = 1  # sequences per forward on each process
    min_lr: float = 0.0
    # learning rate of the trained parameters outside the token mixers (MLPs, norms, embeddings, head); default `lr`.
    # The mixers are rewritten and need a large rate; the rest already holds what the source knows. The schedule
    # scales both alike (min_lr applies to the mixers; the rest ends at min_lr * lr_outside_mixers / lr).
    lr_outside_mixers: float | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # WSD: the final fraction of steps that decays
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float | None = 1.0
    trainable: Union[str, list[str]] = "all"
    lora: LoraSpec = field(default_factory=LoraSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    sparse: bool = True
    dense_len: int | None = None
    gradient_checkpointing: bool = False
    eval_every: int | None = None
    eval_sequences: int = 16
    # this stage's mixture: one weight per data source, in data.sources order (held-out sources: 0); default: the
    # sources' own weights. A long-context stage can draw on long documents only.
    data_weights: list[float] | None = None
    # long-range recall: in this fraction of the sequences, the last `recall_span` tokens of the last document are
    # replaced by a copy of a span from the first half of that document, so the language-model loss rewards reading
    # back over the gap (induction at the stage's length); 0 leaves the text as it is
    recall: float = 0.0
    recall_span: int = 64
    # > 0: the copied span lies at least this many tokens before the copy, anywhere in the document (with
    # join_documents, anywhere in the sequence), so that a Lightning window of this size cannot reach it and the
    # recurrent state and the sparse layers must. With 0 the span comes from the first half of the last document:
    # 168-336 tokens before the copy in a 400-token teacher document, partly within a 256-token window's reach
    recall_min_gap: int = 0
    # > 0: the first recall_cue tokens of each copy carry no loss. Nothing announces a copy, so the loss on its
    # first tokens rewards jumping back unprompted; the rest rewards continuing a recognised span. It did not reduce
    # the long stage's prompt echoes on a CPU stand-in (cue 4; recipes/README.md)
    recall_cue: int = 0
    # the documents of a sequence read the earlier ones (one segment per sequence, positions through it, as in most
    # pre-training): every sequence trains the stage's whole length of context even where documents are short, and
    # the teacher reads the same rows; false keeps each document on its own (attention and states never cross)
    join_documents: bool = False
    # with join_documents: the token put between joined documents in place of each one's end-of-text token (e.g. the
    # base model's "<|endoftext|>" where the tokenizer's end of text is an instruct model's end of turn); default:
    # the end-of-text token as cached
    document_separator: str | None = None
    # train past the teacher's max_position_embeddings (a long-context stage with HyPE): refused unless set
    past_source_context: bool = False
    # the student's forward and backward replayed from CUDA graphs (hybridize/train/graphs.py): one GPU, one process,
    # joined documents (every batch one shape), a loss on logits only
    cuda_graphs: bool = False


@dataclass
class OutputSpec:
    dir: str = "runs/hybrid"
    checkpoint_every: int | None = None
    keep_last: int = 2
    export: bool = True  # the final self-contained model folder, output.dir/model
    dtype: str | None = None  # dtype of the exported weights (default: as trained, float32)


@dataclass
class LoggingSpec:
    log_every: int = 10
    trackers: list[str] = field(default_factory=list)  # Accelerate trackers, e.g. [tensorboard]; used when installed
    progress: bool = True


@dataclass
class HubSpec:
    repo_id: str
    private: bool = True


@dataclass
class Recipe:
    stages: list[StageSpec]
    data: DataSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    precision: str = "bf16"
    seed: int = 0
    on_nonfinite: str = "stop"
    push_to_hub: HubSpec | None = None
    source_file: str = ""  # where this recipe came from (for messages)

    def needs_teacher(self) -> bool:
        return any(s.loss.hidden_mse or s.loss.kl for s in self.stages) or any(
            src.type == "teacher" for src in self.data.sources
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source_file", None)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------------------
def _fail(file: str, where: str, message: str):
    raise RecipeError(f"{file}: {where}: {message}")


def _positive(v):
    return None if v > 0 else f"must be positive, got {v}"


def _non_negative(v):
    return None if v >= 0 else f"must be >= 0, got {v}"


def _in_range(lo, hi, *, lo_open=False, hi_open=False):
    def check(v):
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        return None if ok else f"must be in {interval}, got {v}"

    return check


def _each(check):
    """Applied to every item of a list field (the message names the item)."""
    check.each = True
    return check


def _not_blank(v):
    return None if v.strip() else "must not be empty"


# Per-field constraints on values that type-check, applied on load (None, where a field allows it, is not checked).
# Every float must also be finite (see _convert). Cross-field rules live in validate().
CONSTRAINTS: dict[str, dict[str, Any]] = {
    "Recipe": {"seed": _non_negative},
    "ModelSpec": {"sparse_query_log_scale": lambda v: None if v > 1 else f"must be a number above 1 (HALO uses 362), "
                                                                           f"got {v}",
                  "lightning_window": _non_negative, "lightning_sinks": _non_negative,
                  "lightning_sink_reach": _non_negative,
                  "rope_yarn": lambda v: None if v == 0 or v > 1 else f"must be 0 (off) or a factor above 1, got {v}"},
    "SourceSpec": {"weight": _positive, "max_documents": _positive, "num_samples": _positive,
                   "max_new_tokens": _positive, "min_new_tokens": _non_negative, "temperature": _positive,
                   "batch_size": _positive, "max_repetition": _in_range(0.0, 1.0, lo_open=True, hi_open=True)},
    "DataSpec": {"heldout_fraction": _in_range(0.0, 1.0, hi_open=True)},
    "LossSpec": {"hidden_mse": _non_negative, "kl": _non_negative, "ce": _non_negative, "temperature": _positive,
                 "kl_max_position": _positive},
    "LoraSpec": {"r": _positive, "alpha": _positive, "dropout": _in_range(0.0, 1.0, hi_open=True)},
    "StageSpec": {"seq_len": _positive, "global_batch_tokens": _positive, "lr": _positive, "tokens": _positive,
                  "lr_outside_mixers": _positive,
                  "steps": _positive, "micro_batch_size": _positive, "min_lr": _non_negative,
                  "warmup_steps": _non_negative, "decay_fraction": _in_range(0.0, 1.0, lo_open=True),
                  "weight_decay": _non_negative, "betas": _each(_in_range(0.0, 1.0, hi_open=True)),
                  "grad_clip": _non_negative, "dense_len": _non_negative, "eval_every": _positive,
                  "eval_sequences": _non_negative, "recall": _in_range(0.0, 1.0), "recall_span": _positive,
                  "recall_min_gap": _non_negative, "recall_cue": _non_negative},
    "OutputSpec": {"dir": _not_blank, "checkpoint_every": _positive, "keep_last": _positive},
    "LoggingSpec": {"log_every": _positive},
}


def _check_field(cls, name: str, value, file: str, where: str) -> None:
    check = CONSTRAINTS.get(cls.__name__, {}).get(name)
    if check is None or value is None:
        return
    items = list(enumerate(value)) if getattr(check, "each", False) else [(None, value)]
    for i, v in items:
        message = check(v)
        if message:
            _fail(file, where if i is None else f"{where}[{i}]", message)


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin in (list, typing.List):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is Union or origin is types.UnionType:
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value, tp, file: str, where: str):
    """Check/convert one YAML value against a type annotation."""
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, file, where)
            except RecipeError as e:
                errors.append(e)
        _fail(file, where, f"must be {_type_name(tp)}, got {value!r}")
    if origin in (list, typing.List):
        if not isinstance(value, list):
            _fail(file, where, f"must be {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_convert(v, item, file, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, file, where)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(file, where, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            if isinstance(value, str):  # "1_000_000" or "2e6" written as text
                try:
                    parsed = float(value.replace("_", ""))
                    if parsed.is_integer():
                        return int(parsed)
                except ValueError:
                    pass
            _fail(file, where, f"must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                _fail(file, where, f"must be a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(file, where, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML reads .nan / .inf (and "nan" parses): no field means either
            _fail(file, where, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(file, where, f"must be a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp}")  # a bug in this module, not in the recipe


def _build(cls, raw, file: str, where: str):
    if not isinstance(raw, dict):
        _fail(file, where or "recipe", f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        _fail(file, f"{prefix}{unknown[0]}", f"unknown field; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}" if where else name
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], file, sub)
            _check_field(cls, name, kwargs[name], file, sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(file, sub, "is required")
    return cls(**kwargs)


def _choice(file, where, value, allowed):
    if value not in allowed:
        _fail(file, where, f"must be one of {', '.join(allowed)}; got {value!r}")


def validate(recipe: Recipe) -> Recipe:
    """Checks across fields that types alone cannot express."""
    f = recipe.source_file
    _choice(f, "precision", recipe.precision, PRECISIONS)
    _choice(f, "on_nonfinite", recipe.on_nonfinite, NONFINITE)
    _choice(f, "teacher.dtype", recipe.teacher.dtype, DTYPE_NAMES)
    _choice(f, "model.lightning_decay", recipe.model.lightning_decay, ("sala", "layerwise"))
    _choice(f, "model.lightning_kv_heads", recipe.model.lightning_kv_heads, ("query", "source"))
    m = recipe.model
    if m.select is not None:
        _choice(f, "model.select", m.select, SELECT_METHODS)
    if m.score_report is not None and m.select not in SCORE_METHODS:
        _fail(f, "model.score_report", f"a score report places layers with select: sala, block_influence or window, "
                                       f"not {m.select!r}")
    if m.lightning_window and m.lightning_sinks > m.lightning_window:
        _fail(f, "model.lightning_sinks", f"must be from 0 to model.lightning_window; got {m.lightning_sinks}")
    if m.lightning_window and m.lightning_sink_reach and m.lightning_sink_reach < 2 * m.lightning_window:
        _fail(f, "model.lightning_sink_reach", f"must be 0 (off) or at least twice model.lightning_window "
                                               f"({2 * m.lightning_window}); got {m.lightning_sink_reach}")
    for field, flag in (("lightning_window", "--lightning-window"), ("lightning_sink_reach", "--lightning-sink-reach"),
                        ("rope_yarn", "--rope-yarn")):
        if getattr(m, field) and m.converted is not None:
            _fail(f, f"model.{field}", f"applies to a conversion made by the recipe, and a converted folder keeps its "
                                       f"own: with model.converted set model.{field} to 0 (e.g. --set "
                                       f"model.{field}=0), or convert with {flag}")
    if m.source is None and m.converted is None:
        _fail(f, "model.source", "give model.source (a checkpoint to convert) or model.converted (a hybrid folder)")
    if not recipe.stages:
        _fail(f, "stages", "must list at least one stage")
    if not recipe.data.sources:
        _fail(f, "data.sources", "must list at least one data source")
    for i, s in enumerate(recipe.data.sources):
        w = f"data.sources[{i}]"
        _choice(f, f"{w}.type", s.type, SOURCE_TYPES)
        if s.type == "teacher":
            if s.prompts is not None and not s.prompts:
                _fail(f, f"{w}.prompts", "an empty list: give prompts, or leave prompts out for the built-in ones")
            if s.min_new_tokens > s.max_new_tokens:
                _fail(f, f"{w}.min_new_tokens", f"{s.min_new_tokens} is more than max_new_tokens ({s.max_new_tokens})")
            if s.start_token is not None and not s.unprompted:
                _fail(f, f"{w}.start_token", "the token unprompted samples start from: only with unprompted: true")
            if s.unprompted and s.prompts is not None:
                _fail(f, f"{w}.unprompted", "samples start from no prompt: drop `prompts` or set unprompted: false")
        elif not s.path:
            _fail(f, f"{w}.path", f"a {s.type} source needs a path")
        if s.unprompted and s.type != "teacher":
            _fail(f, f"{w}.unprompted", f"only a teacher source samples text; a {s.type} source reads it")
    if not any(not s.heldout for s in recipe.data.sources):
        _fail(f, "data.sources", "every source is marked heldout: at least one must feed training")
    names = set()
    for i, s in enumerate(recipe.stages):
        w = f"stages[{i}]"
        if s.name in names:
            _fail(f, f"{w}.name", f"stage names must be unique; {s.name!r} repeats")
        names.add(s.name)
        if s.global_batch_tokens % s.seq_len:
            _fail(f, f"{w}.global_batch_tokens", f"must be a multiple of seq_len ({s.seq_len}), got {s.global_batch_tokens}")
        if (s.tokens is None) == (s.steps is None):
            _fail(f, f"{w}.tokens", "give exactly one of tokens or steps")
        if s.min_lr > s.lr:
            _fail(f, f"{w}.min_lr", f"must not exceed lr ({s.lr}), got {s.min_lr}")
        _choice(f, f"{w}.schedule", s.schedule, SCHEDULES)
        if s.schedule == "exponential" and s.min_lr <= 0:
            _fail(f, f"{w}.min_lr", "the exponential schedule needs min_lr > 0")
        if len(s.betas) != 2:
            _fail(f, f"{w}.betas", f"must be two numbers, got {s.betas}")
        if s.document_separator is not None and not s.join_documents:
            _fail(f, f"{w}.document_separator", "only with join_documents: true (it stands between joined documents)")
        if s.document_separator is not None and not recipe.data.append_eos:
            _fail(f, f"{w}.document_separator", "replaces the end-of-text token each document ends with: needs "
                                                "data.append_eos: true")
        if s.recall > 0 and s.recall_min_gap and s.recall_span + s.recall_min_gap >= s.seq_len:
            _fail(f, f"{w}.recall_min_gap", f"a copy {s.recall_min_gap} tokens after its span does not fit "
                                            f"seq_len {s.seq_len} with recall_span {s.recall_span}")
        if s.recall_cue >= s.recall_span:
            _fail(f, f"{w}.recall_cue", f"{s.recall_cue} unscored tokens leave nothing of a {s.recall_span}-token copy "
                                        "to train: set it below recall_span")
        if s.recall > 0 and 4 * s.recall_span > s.seq_len:
            _fail(f, f"{w}.recall_span", f"a recall copy needs a document of 4 spans: 4 x {s.recall_span} is more "
                                         f"than seq_len {s.seq_len}")
        if s.data_weights is not None:
            srcs = recipe.data.sources
            if len(s.data_weights) != len(srcs):
                _fail(f, f"{w}.data_weights", f"give one weight per data source ({len(srcs)}), got {len(s.data_weights)}")
            if any(not (math.isfinite(x) and x >= 0) for x in s.data_weights):
                _fail(f, f"{w}.data_weights", f"weights must be finite and >= 0, got {s.data_weights}")
            if not any(x > 0 for x, src in zip(s.data_weights, srcs) if not src.heldout):
                _fail(f, f"{w}.data_weights", "no training source has a positive weight")
        if isinstance(s.trainable, str):
            _choice(f, f"{w}.trainable", s.trainable, PRESETS + ("or a list of glob patterns",))
        elif not s.trainable:
            _fail(f, f"{w}.trainable", "an empty pattern list trains nothing")
        loss = s.loss
        if not (loss.hidden_mse or loss.kl or loss.ce):
            _fail(f, f"{w}.loss", "all loss weights are 0: set hidden_mse, kl or ce")
        _choice(f, f"{w}.loss.kl_direction", loss.kl_direction, KL_DIRECTIONS)
        if loss.kl_max_position is not None and not loss.kl:
            _fail(f, f"{w}.loss.kl_max_position", "limits the teacher's KL term, which this stage does not have: set "
                  "loss.kl above 0 or drop kl_max_position")
        if loss.kl_max_position is not None and not (loss.ce or loss.hidden_mse) and loss.kl_max_position < s.seq_len:
            _fail(f, f"{w}.loss.kl_max_position", f"leaves positions {loss.kl_max_position}-{s.seq_len - 1} of each "
                  "row without a loss: add ce (or raise it to seq_len)")
        _choice(f, f"{w}.loss.hidden_layers", loss.hidden_layers, HIDDEN_LAYERS)
        _choice(f, f"{w}.loss.hidden_inputs", loss.hidden_inputs, HIDDEN_INPUTS)
        _choice(f, f"{w}.loss.hidden_at", loss.hidden_at, HIDDEN_AT)
        if loss.hidden_at == "mixer" and loss.hidden_inputs != "teacher_inputs":
            _fail(f, f"{w}.loss.hidden_at", "mixer outputs are compared with every layer fed the teacher's input: set "
                  "hidden_inputs: teacher_inputs")
        if loss.hidden_at == "mixer" and s.gradient_checkpointing:
            _fail(f, f"{w}.gradient_checkpointing", "a stage that compares mixer outputs skips the MLPs, which a "
                  "recomputed layer would run: leave gradient_checkpointing off (the stage keeps few activations)")
        if s.cuda_graphs and not s.join_documents:
            _fail(f, f"{w}.cuda_graphs", "a graph replays one shape: needs join_documents: true (packed documents "
                                          "give every batch its own)")
        if s.cuda_graphs and (loss.hidden_mse or s.gradient_checkpointing or s.trainable == "lora"):
            _fail(f, f"{w}.cuda_graphs", "graphs record the student's logits alone: not with hidden_mse, "
                                          "gradient_checkpointing or lora")
        if loss.hidden_inputs == "teacher_inputs" and (loss.kl or loss.ce):
            _fail(f, f"{w}.loss.hidden_inputs", "teacher_inputs aligns layers one by one: combine it with hidden_mse only")
    if recipe.output.dtype is not None:
        _choice(f, "output.dtype", recipe.output.dtype, DTYPE_NAMES)
    return recipe


def set_override(raw: dict, assignment: str, file: str = "--set") -> None:
    """Apply `a.b[1].c=value` (value parsed as YAML) to a raw recipe mapping in place; `a.b[n]=...` on a list of n
    items appends."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages[0].lr=1e-4")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts: list[str | int] = []
    for piece in key.strip().split("."):
        name, _, rest = piece.partition("[")
        if name:
            parts.append(name)
        while rest:
            idx, _, rest = rest.partition("]")
            try:
                parts.append(int(idx))
            except ValueError:
                raise RecipeError(f"--set {key}: bad list index {idx!r}") from None
            rest = rest.lstrip("[")
    node: Any = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(p, int):
            if not isinstance(node, list) or not -len(node) <= p < len(node):
                raise RecipeError(f"--set {key}: no list item {p} there")
            node = node[p]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {p!r} is not inside a mapping")
            node = node.setdefault(p, {} if not isinstance(parts[i + 1], int) else [])
    last = parts[-1]
    if isinstance(last, int):
        # one past the end appends, so that a run can add a data source without a copy of the recipe
        if isinstance(node, list) and last == len(node):
            node.append(value)
            return
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            size = f" ({len(node)} items; index {len(node)} appends)" if isinstance(node, list) else ""
            raise RecipeError(f"--set {key}: no list item {last} there{size}")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise RecipeError(f"--set {key}: {last!r} is not inside a mapping")


def recipe_from_dict(raw: dict, file: str = "<recipe>") -> Recipe:
    recipe = _build(Recipe, raw, file, "")
    recipe.source_file = file
    return validate(recipe)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Relative paths inside it stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise RecipeError(f"{path}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: recipe: must be a mapping of sections (model, data, stages, ...)")
    for assignment in overrides:
        set_override(raw, assignment)
    return recipe_from_dict(raw, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# The run's identity (stored in checkpoints, compared on --resume)
# ---------------------------------------------------------------------------------------------------------------------
# Fields that change neither the weights nor the data a run sees: a resumed run may set them differently.
_NOT_DEFINING = {"data": ("cache_dir",),
                 "stages": ("micro_batch_size", "gradient_checkpointing", "eval_every", "eval_sequences",
                            "past_source_context", "cuda_graphs")}


def run_fingerprint(recipe: Recipe) -> dict:
    """The recipe fields that define a run's result: model, teacher, data, stages and seed, without output, logging
    and the settings that only trade memory or time (micro-batch size, activation checkpointing, evaluation)."""
    full = json.loads(json.dumps(recipe.to_dict(), default=str))
    out = {k: full[k] for k in ("model", "teacher", "data", "stages", "seed")}
    for key in _NOT_DEFINING["data"]:
        out["data"].pop(key, None)
    for stage in out["stages"]:
        for key in _NOT_DEFINING["stages"]:
            stage.pop(key, None)
    return out


_SPEC_AT = {"model": ModelSpec, "teacher": TeacherSpec, "data": DataSpec, "data.sources": SourceSpec,
            "stages": StageSpec, "stages.loss": LossSpec, "stages.lora": LoraSpec}
_NO_DEFAULT = object()


def _field_default(where: str, key: str):
    """The default of field `key` in the section at fingerprint path `where` ("stages[2].loss" -> LossSpec), as the
    fingerprint writes it; _NO_DEFAULT where the field has none or is unknown."""
    spec = _SPEC_AT.get(".".join(part.split("[")[0] for part in where.split(".")))
    f = {x.name: x for x in dataclasses.fields(spec)}.get(key) if spec else None
    if f is None:
        return _NO_DEFAULT
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    else:
        return _NO_DEFAULT
    return json.loads(json.dumps(value, default=str))


def fingerprint_difference(stored, current, where: str = "") -> str | None:
    """The first field (dotted path) where two fingerprints differ, with both values; None when they match. A field
    present on one side only (a checkpoint written before the field existed) matches when it holds its default."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in list(stored) + [k for k in current if k not in stored]:
            sub = f"{where}.{key}" if where else key
            if key not in stored or key not in current:
                present = current[key] if key in current else stored[key]
                if _field_default(where, key) == present:
                    continue
                return f"{sub}: {stored.get(key, '(absent)')!r} in the checkpoint, {current.get(key, '(absent)')!r} now"
            found = fingerprint_difference(stored[key], current[key], sub)
            if found:
                return found
        return None
    if isinstance(stored, list) and isinstance(current, list) and where in ("stages", "data.sources"):
        for i, (a, b) in enumerate(zip(stored, current)):
            found = fingerprint_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        if len(stored) != len(current):
            return f"{where}: {len(stored)} in the checkpoint, {len(current)} now"
        return None
    if stored != current:
        return f"{where}: {stored!r} in the checkpoint, {current!r} now"
    return None


__all__ = ["Recipe", "RecipeError", "StageSpec", "load_recipe", "recipe_from_dict", "set_override"]
