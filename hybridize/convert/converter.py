"""`hybridize convert`: source checkpoint -> self-contained hybrid model folder, streamed.

Steps: open the source and check its tensors against its config, once (source.open_checked); choose the sparse
layers; plan every output tensor (names, shapes, shards) from the specs alone; then stream the source tensor by tensor
through the family adapter and the hybrid mapping (build.map_tensor) straight into the planned safetensors shards.
The hybrid model is never built in memory, and the source is read once: a source already in memory (loaded for a
scoring --select method, or a GGUF model) is streamed from there, and the before/after sample reuses what was read
(keep_source). Without those, peak memory stays near one copy of the model (bench/results/convert.md).
Everything is written into a temporary folder renamed into place at the end (export.atomic_folder).
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import __version__
from ..arch.configuration_hybridize import HybridConfig
from ..card import Conversion, model_card, write_card
from ..common import parse_dtype
from ..export import AUTO_MAP, atomic_folder, check_output, copy_architecture
from ..select.placement import layer_types_for, layer_types_from, parse_ratio, sparse_count, sparse_indices
from ..select.registry import SELECTORS, get_selector, needs_weights
from .build import added_tensors, check_rope_yarn, hybrid_config_from_source, map_tensor
from .checkpoint import Checkpoint, ignored
from .families import Family
from .safetensors_io import ShardedSafetensorsWriter, TensorSpec, parse_size
from .source import cast_floating, load_source_model, model_from_tensors, open_checked, source_tokenizer


@dataclass
class ConvertResult:
    output: Path
    sparse_layers: list[int]
    num_layers: int
    source: str
    extras: dict = field(default_factory=dict)
    method: str = "uniform"
    checkpoint: Checkpoint | None = field(default=None, repr=False)
    source_model: Any = field(default=None, repr=False)  # the source as a transformers model, when kept (keep_source)
    calibration: dict | None = None  # the output-norm fit (convert's `calibrate`), when one was made


# ---------------------------------------------------------------------------------------------------------------------
# Layer choice
# ---------------------------------------------------------------------------------------------------------------------
# Placement when neither --select nor --layers is given: block influence where the source is small enough to run
# unasked, else uniform. After the same 50 training steps (CPU, SmolLM2-135M 1:3, bench/results/retention.md), held-out
# perplexity was 221 / 303 / 178 (wiki / news / pydoc) with block influence's layers, 343 / 424 / 329 with uniform
# ones; on the H200, uniform placement's held-out loss after distillation was 5.46 nats against 2.78 and 2.70 (block
# influence, SALA). Block influence costs a few forward passes; SALA's score costs minutes. After the full retention
# recipe (H200, 76.4M tokens, retention.md twelfth session) the two placements' held-out perplexity was the same
# (1.568x and 1.573x the source) but SALA's retrieved better (pass-key 32 against 22 of 42), so recipes place by SALA.
DEFAULT_SCORED_METHOD = "block_influence"
RUN_UNASKED_MAX_PARAMETERS = 1_500_000_000  # above this, running the source on a CPU takes too long to do unasked


def runs_unasked(ckpt: Checkpoint | None) -> bool:
    """Whether convert runs the source unasked (layer scoring, calibration, the before/after sample): its size."""
    return ckpt is None or ckpt.num_parameters <= RUN_UNASKED_MAX_PARAMETERS


def default_placement(num_parameters: int, has_tokenizer: bool) -> str:
    """The placement used when neither a method nor a layer list is given (convert and recipes alike):
    DEFAULT_SCORED_METHOD for a source small enough to run unasked that has a tokenizer (scoring reads text), else
    uniform."""
    return DEFAULT_SCORED_METHOD if num_parameters <= RUN_UNASKED_MAX_PARAMETERS and has_tokenizer else "uniform"


def resolve_method(select: str | None, layers: list[int] | None) -> str | None:
    """--select and --layers together: 'layers' for an explicit list, a registered method, or None for convert's
    default, which depends on the source (default_placement)."""
    if select is None:
        return "layers" if layers is not None else None
    if select not in SELECTORS and select.replace("-", "_") in SELECTORS:
        select = select.replace("-", "_")  # --select block-influence finds block_influence
    if select == "layers":
        if layers is None:
            raise ValueError("--select layers needs --layers (e.g. --layers 0,9,16)")
        return select
    get_selector(select)
    if layers is not None:
        raise ValueError(f"give either --layers or --select {select}, not both")
    return select


def choose_sparse_layers(
    num_layers: int,
    ratio: str = "1:3",
    layers: list[int] | None = None,
    select: str | None = None,
    model: Any = None,
    **select_options,
) -> list[int]:
    """Sparse layer indices: the explicit list, or `select`'s choice (uniform when None) of num_sparse_layers(ratio)
    layers."""
    method = resolve_method(select, layers) or "uniform"
    if method in ("layers", "uniform"):
        return sparse_indices(layer_types_for(num_layers, ratio, layers if method == "layers" else None))
    if model is None:
        raise ValueError(f"--select {method} needs the source model")
    chosen = sorted(get_selector(method)(model, sparse_count(num_layers, ratio), **select_options))
    layer_types_from(num_layers, chosen)
    return chosen


class _ConfigOnly:
    """What a selector that needs no weights receives: the model's config and nothing else."""

    def __init__(self, config):
        self.config = config


# ---------------------------------------------------------------------------------------------------------------------
# Checks and plan
# ---------------------------------------------------------------------------------------------------------------------
def hybrid_tensors(
    family: Family, name: str, tensor: torch.Tensor, ckpt: Checkpoint, config: HybridConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """The hybrid tensors made from one source tensor: family names -> Llama names -> hybrid names."""
    if ignored(name):
        return
    for llama_name, llama_tensor in family.to_llama(name, tensor, ckpt.config):
        yield from map_tensor(llama_name, llama_tensor, config)


def plan_output(
    ckpt: Checkpoint, family: Family, config: HybridConfig, dtype: torch.dtype
) -> tuple[dict[str, TensorSpec], set[str]]:
    """Every output tensor's spec, computed on the meta device from the source specs, checked against the
    architecture; and the names that come from source tensors (the rest are new parameters)."""
    from ..arch.modeling_hybridize import HybridForCausalLM

    plan: dict[str, TensorSpec] = {}
    for name, spec in ckpt.specs.items():
        empty = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        for out_name, out in hybrid_tensors(family, name, empty, ckpt, config):
            plan[out_name] = TensorSpec(tuple(out.shape), cast_floating(out, dtype).dtype)
    from_source = set(plan)
    for out_name, out in added_tensors(config, from_source, dtype, device="meta"):
        plan[out_name] = TensorSpec(tuple(out.shape), out.dtype)
    with torch.device("meta"):
        model = HybridForCausalLM(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    wrong = sorted(n for n in set(expected) | set(plan) if expected.get(n) != (plan[n].shape if n in plan else None))
    if wrong:  # the source was checked already: this is a mapping bug, not bad input
        n = wrong[0]
        raise RuntimeError(f"hybrid mapping produced {n}: {plan.get(n)} but the architecture expects {expected.get(n)}")
    return plan, from_source


# ---------------------------------------------------------------------------------------------------------------------
# Convert
# ---------------------------------------------------------------------------------------------------------------------
def convert(
    source: str | None = None,
    output: str | Path = "hybrid-model",
    *,
    ratio: str = "1:3",
    layers: list[int] | None = None,
    select: str | None = None,
    config: str | Path | None = None,
    hype: bool = True,
    gates: bool = True,
    dtype: str | None = None,
    force: bool = False,
    max_shard_size: str | int = "2GB",
    progress: bool = True,
    select_options: dict | None = None,
    students: str | Path | None = None,
    keep_source: bool | Callable[[Checkpoint], bool] = False,
    calibrate: bool | None = None,
    lightning_window: int = 0,
    lightning_sinks: int = 4,
    lightning_sink_reach: int | None = None,
    rope_yarn: float = 0.0,
) -> ConvertResult:
    """Convert `source` (None: the built-in SmolLM2-135M) into a hybrid model folder at `output`.
    `select_options` go to the --select method (e.g. score_report=); a method that needs weights also gets the
    source model and `tokenizer=` (the source's, or None). `students`: a students.safetensors written by
    `hybridize score`; its aligned Lightning weights replace the fresh ones in the Lightning layers.
    `keep_source` (or, as a function, its answer for the opened checkpoint): also return the source as a
    transformers model (result.source_model), made from the tensors already read, for the before/after sample.
    `calibrate`: fit the Lightning layers' output norms to the source's attention outputs on the built-in plays
    (select.alignment.calibrate_lightning_outputs; a fresh Lightning layer's output is 3-30x too large); None: when
    the source has a tokenizer and runs unasked (at most RUN_UNASKED_MAX_PARAMETERS parameters: it runs on the CPU).
    `lightning_window` / `lightning_sinks`: a softmax window branch in every Lightning layer (HybridConfig; 0: none);
    `lightning_sink_reach`: how far back its sinks are read from at most (None: the source's context; 0: off).
    `rope_yarn`: RoPE rescaled YaRN-style by that factor over the source's context (build.yarn_rope; 0: none).
    Without `select` and `layers`, the sparse layers are placed by `default_placement`."""
    output = Path(output)
    inputs = (source, config, students, (select_options or {}).get("score_report"))
    # Cheap checks first: nothing is read when the options are wrong.
    check_output(output, force=force, inputs=inputs)
    method = resolve_method(select, layers)
    if method != "layers":
        parse_ratio(ratio)
    chosen_dtype = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    check_rope_yarn(rope_yarn)
    if lightning_window and lightning_sink_reach and lightning_sink_reach < 2 * lightning_window:
        raise ValueError(f"--lightning-sink-reach must be 0 (off) or at least twice --lightning-window "
                         f"({2 * lightning_window}), got {lightning_sink_reach}")

    ckpt = open_checked(source, config)
    family = ckpt.family
    num_layers = ckpt.config.num_hidden_layers
    options = dict(select_options or {})
    # read once, when first needed: the default placement, scoring and calibration all read text
    tokenizer = functools.cache(lambda: options["tokenizer"] if "tokenizer" in options else source_tokenizer(ckpt))
    if method is None:
        method = default_placement(ckpt.num_parameters, tokenizer() is not None)
        if method != "uniform":  # the CPU settings, scored afresh: a few forward passes, not worth a cache file
            from ..select.api import ScoreSettings

            options["score_settings"] = ScoreSettings(method=method)
    if method == "window":
        from ..select.selectors import window_cut

        options = {**window_cut(lightning_window, lightning_sinks, hype), **options}
    selector_model = _selector_model(ckpt, method, options, progress, tokenizer)
    sparse_layers = choose_sparse_layers(num_layers, ratio, layers, method, selector_model, **options)
    loaded = selector_model if selector_model is not None and not isinstance(selector_model, _ConfigOnly) else None
    del selector_model
    arch = dict(hype=hype, output_gates=gates, lightning_window=lightning_window, lightning_sinks=lightning_sinks,
                lightning_sink_reach=lightning_sink_reach, rope_yarn=rope_yarn, **family.hybrid_options(ckpt.config))
    hconfig = hybrid_config_from_source(ckpt.config, layer_types_from(num_layers, sparse_layers), **arch)
    out_dtype = chosen_dtype or _source_dtype(ckpt)
    plan, from_source = plan_output(ckpt, family, hconfig, out_dtype)
    aligned = _aligned_students(students, hconfig, plan) if students is not None else {}
    calibration = None
    if students is None and calibrate is not False and wants_calibration(ckpt, calibrate, tokenizer()):
        loaded = loaded if loaded is not None else load_source_model(ckpt)
        aligned, calibration = calibrated_output_norms(loaded, tokenizer(), hconfig.layer_types, **arch)
    keep = keep_source(ckpt) if callable(keep_source) else bool(keep_source)

    with atomic_folder(output, force=force, inputs=inputs) as tmp:
        writing = _Writing(ckpt, hconfig, plan, from_source, aligned, out_dtype)
        kept = writing.write(tmp, max_bytes, progress, loaded=loaded, keep=keep)
        hconfig.conversion = {
            "source": ckpt.source, "source_format": ckpt.format, "family": family.model_type, "method": method,
            "ratio": None if method == "layers" else ratio, "hybridize_version": __version__,
            "aligned_students": str(students) if students is not None else None,
            "calibrated_output_norms": calibration,
        }
        _write_config(tmp, hconfig, out_dtype)
        _write_generation_config(tmp, ckpt)
        _write_tokenizer(tmp, ckpt)
        copy_architecture(tmp)
        write_card(tmp, model_card(conversion=Conversion(
            name=output.name, source=ckpt.source, source_format=ckpt.format, family=family.label,
            layer_types=hconfig.layer_types, method=method, ratio=None if method == "layers" else ratio, hype=hype,
            gates=gates, dtype=str(out_dtype).removeprefix("torch."), version=__version__,
            base_model=ckpt.source if ckpt.folder is not None and _is_hub_id(ckpt) else None,
        )))
    return ConvertResult(output, sparse_layers, num_layers, ckpt.source,
                         extras={"format": ckpt.format, "family": family.model_type, "notes": ckpt.notes},
                         method=method, checkpoint=ckpt, source_model=kept, calibration=calibration)


def wants_calibration(ckpt: Checkpoint, requested: bool | None, tokenizer) -> bool:
    """`requested`, or (None) whether the source runs unasked; `tokenizer`: the source's (None when it has none:
    calibration needs text)."""
    if requested is not None:
        if requested and tokenizer is None:
            raise ValueError(f"{ckpt.source} has no tokenizer, which calibration needs: copy its tokenizer files "
                             "beside it or convert with --no-calibrate")
        return requested
    return runs_unasked(ckpt) and tokenizer is not None


def calibrated_output_norms(source_model, tokenizer, layer_types: list[str], **config_options
                            ) -> tuple[dict[str, torch.Tensor], dict]:
    """The Lightning output-norm weights of the hybrid (`layer_types`, `config_options` as for build_hybrid) fitted
    to `source_model`, under the hybrid's tensor names, and the record of the fit (select.alignment)."""
    from ..select.alignment import calibrate_on_plays
    from .build import build_hybrid

    hybrid = build_hybrid(source_model, layer_types, **config_options)
    record = calibrate_on_plays(hybrid, source_model, tokenizer)
    weights = {f"model.layers.{i}.self_attn.o_norm.weight": hybrid.model.layers[int(i)].self_attn.o_norm.weight.detach()
               for i in record["relative_error"]}
    return weights, record


def _selector_model(ckpt: Checkpoint, method: str, options: dict, progress: bool, tokenizer: Callable[[], Any]):
    """What the --select method sees: nothing (layers, uniform), the config alone, or the source model; a method
    that needs weights also gets the source's tokenizer (`tokenizer()`) through `options`."""
    if method in ("layers", "uniform"):
        return None
    if not needs_weights(get_selector(method)):
        return _ConfigOnly(ckpt.config)
    options.setdefault("tokenizer", tokenizer())
    options.setdefault("progress", progress)
    return load_source_model(ckpt)


@dataclass
class _Writing:
    """The weights part of a conversion: stream the source through the mapping into the planned shards."""

    ckpt: Checkpoint
    hconfig: HybridConfig
    plan: dict[str, TensorSpec]
    from_source: set[str]
    aligned: dict[str, torch.Tensor]
    dtype: torch.dtype

    def write(self, folder: Path, max_bytes: int, progress: bool, *, loaded=None, keep: bool = False):
        """Write the shards; return the source model when `keep` (None otherwise). A source already in memory
        (`loaded` for the layer choice, or a GGUF model) is streamed from there, so no file is read twice."""
        from tqdm.auto import tqdm

        ckpt = self.ckpt
        loaded = loaded if loaded is not None else ckpt.model
        if loaded is not None:  # tied weights appear twice in a state dict; the specs name each tensor once
            stream = ((n, t) for n, t in loaded.state_dict().items() if n in ckpt.specs)
        else:
            stream = ckpt.stream()
        kept = {} if keep and loaded is None else None
        with ShardedSafetensorsWriter(folder, self.plan, max_bytes) as writer:
            total = sum(spec.nbytes for spec in ckpt.specs.values())
            with tqdm(total=total, unit="B", unit_scale=True, desc="reading + writing weights",
                      disable=not progress) as bar:
                for name, tensor in stream:
                    for out_name, out in hybrid_tensors(ckpt.family, name, tensor, ckpt, self.hconfig):
                        writer.write(out_name, cast_floating(self.aligned.get(out_name, out), self.dtype))
                    bar.update(ckpt.specs[name].nbytes if name in ckpt.specs else 0)
                    if kept is not None:
                        kept[name] = tensor
                    del tensor
            for out_name, out in added_tensors(self.hconfig, self.from_source, self.dtype):
                writer.write(out_name, cast_floating(self.aligned.get(out_name, out), self.dtype))
            writer.finish()
        if not keep:
            return None
        return loaded.float() if loaded is not None else model_from_tensors(ckpt, kept.items())


def _aligned_students(path: str | Path, hconfig: HybridConfig, plan: dict) -> dict[str, torch.Tensor]:
    """The Lightning-layer tensors of a students file, checked against the planned output (names, shapes, gates)."""
    from ..select.alignment import read_aligned_students

    return read_aligned_students(path, {n: spec.shape for n, spec in plan.items()}, hconfig.layer_types,
                                 hconfig.output_gates, what="--students",
                                 fix_gates=lambda has: f"convert with {'--gates' if has else '--no-gates'}")


def _is_hub_id(ckpt: Checkpoint) -> bool:
    return not Path(ckpt.source).exists() and "/" in ckpt.source


def _source_dtype(ckpt: Checkpoint) -> torch.dtype:
    embed = ckpt.specs.get("model.embed_tokens.weight")
    if embed is not None and embed.dtype.is_floating_point:
        return embed.dtype
    return torch.float32


def _write_config(folder: Path, config: HybridConfig, dtype: torch.dtype) -> None:
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["HybridForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(folder)


def _write_generation_config(folder: Path, ckpt: Checkpoint) -> None:
    from transformers import GenerationConfig

    generation = ckpt.generation_config or GenerationConfig.from_model_config(ckpt.config)
    generation.save_pretrained(folder)


def _write_tokenizer(folder: Path, ckpt: Checkpoint) -> bool:
    """The source's tokenizer (and chat template) beside the weights; False when the source has none."""
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save_pretrained(folder)
        return True
    files = ckpt.tokenizer_files()
    if ckpt.format == "meta" and files:  # Meta ships only tokenizer.model: let transformers turn it into a tokenizer
        try:
            from transformers import AutoTokenizer, LlamaTokenizer

            tokenizer = LlamaTokenizer(vocab_file=str(files[0]))
            tokenizer.save_pretrained(folder)
            AutoTokenizer.from_pretrained(folder)
            return True
        except Exception as e:  # noqa: BLE001 - any failure just means no tokenizer in the output
            ckpt.notes.append(f"tokenizer.model could not be converted ({type(e).__name__}): no tokenizer written")
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
                (folder / name).unlink(missing_ok=True)
            return False
    for path in files:
        shutil.copyfile(path, folder / path.name)
    if not files:
        ckpt.notes.append("the source has no tokenizer files: none written")
    return bool(files)
