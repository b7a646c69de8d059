"""`hybridize convert`: source checkpoint -> self-contained hybrid model folder, streamed.

Steps: open the source (readers.py) and check its tensors against its config; choose the sparse layers; plan every
output tensor (names, shapes, shards) from the specs alone; then stream the source tensor by tensor through the family
adapter and the hybrid mapping (build.map_tensor) straight into the planned safetensors shards. The hybrid model is
never built in memory, and the source is read once: peak memory stays near one copy of the model (bench/RESULTS.md).
Everything is written into a temporary folder renamed into place at the end (export.atomic_folder).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import __version__
from ..arch.configuration_hybridize import LIGHTNING, HybridConfig
from ..export import AUTO_MAP, atomic_folder, check_output, copy_architecture
from ..select.placement import layer_types_from, num_sparse_layers, parse_ratio, uniform_layers
from ..select.registry import SELECTORS, get_selector, needs_weights
from .build import added_tensors, hybrid_config_from_source, map_tensor
from .errors import WeightMismatchError
from .families import Family, family_for
from .model_card import model_card
from .readers import Checkpoint, open_checkpoint
from .safetensors_io import ShardedSafetensorsWriter, TensorSpec, parse_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old Llama checkpoints saved the RoPE table; it is recomputed


@dataclass
class ConvertResult:
    output: Path
    sparse_layers: list[int]
    num_layers: int
    source: str
    extras: dict = field(default_factory=dict)
    method: str = "uniform"
    checkpoint: Checkpoint | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------------------------
# Layer choice
# ---------------------------------------------------------------------------------------------------------------------
def resolve_method(select: str | None, layers: list[int] | None) -> str:
    """--select and --layers together: 'layers' for an explicit list, else a registered method (default uniform)."""
    if select is None:
        return "layers" if layers is not None else "uniform"
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
    """Sparse layer indices: the explicit list, or `select`'s choice of num_sparse_layers(ratio) layers."""
    method = resolve_method(select, layers)
    if method == "layers":
        layer_types_from(num_layers, layers)  # range check
        return sorted(set(layers))
    sparse, linear = parse_ratio(ratio)
    n_sparse = num_sparse_layers(num_layers, sparse, linear)
    if model is None:
        if method != "uniform":
            raise ValueError(f"--select {method} needs the source model")
        return uniform_layers(num_layers, n_sparse)
    chosen = sorted(get_selector(method)(model, n_sparse, **select_options))
    layer_types_from(num_layers, chosen)
    return chosen


class _ConfigOnly:
    """What a selector that needs no weights receives: the model's config and nothing else."""

    def __init__(self, config):
        self.config = config


# ---------------------------------------------------------------------------------------------------------------------
# Checks and plan
# ---------------------------------------------------------------------------------------------------------------------
def _ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def check_weights(ckpt: Checkpoint) -> None:
    """Every tensor the config implies is present with its shape, and nothing else is: one-line errors otherwise."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(ckpt.config)
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    tied = bool(getattr(ckpt.config, "tie_word_embeddings", False))
    hint = "are the weights and the config from the same model?"
    missing = [n for n in expected if n not in ckpt.specs and not (tied and n == "lm_head.weight")]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightMismatchError(
            f"the weights in {ckpt.source} lack {missing[0]}{more}, which {ckpt.config_file} requires: {hint}"
        )
    for name, shape in expected.items():
        spec = ckpt.specs.get(name)
        if spec is not None and spec.shape != shape:
            where = spec.file or ckpt.source
            raise WeightMismatchError(
                f"{name} has shape {list(spec.shape)} in {where} but {ckpt.config_file} implies {list(shape)}: {hint}"
            )
    extra = [n for n in ckpt.specs if n not in expected and not _ignored(n)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightMismatchError(
            f"the weights in {ckpt.source} hold {extra[0]}{more}, which {ckpt.config_file} does not describe: {hint}"
        )


def hybrid_tensors(
    family: Family, name: str, tensor: torch.Tensor, ckpt: Checkpoint, config: HybridConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """The hybrid tensors made from one source tensor: family names -> Llama names -> hybrid names."""
    if _ignored(name):
        return
    for llama_name, llama_tensor in family.to_llama(name, tensor, ckpt.config):
        yield from map_tensor(llama_name, llama_tensor, config)


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


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
            plan[out_name] = TensorSpec(tuple(out.shape), _cast(out, dtype).dtype)
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
) -> ConvertResult:
    """Convert `source` (None: the built-in SmolLM2-135M) into a hybrid model folder at `output`.
    `select_options` go to the --select method (e.g. score_report=); a method that needs weights also gets the
    source model and `tokenizer=` (the source's, or None). `students`: a students.safetensors written by
    `hybridize score`; its aligned Lightning weights replace the fresh ones in the Lightning layers."""
    from tqdm.auto import tqdm

    output = Path(output)
    inputs = (source, config, students, (select_options or {}).get("score_report"))
    # Cheap checks first: nothing is read when the options are wrong.
    check_output(output, force=force, inputs=inputs)
    method = resolve_method(select, layers)
    if method != "layers":
        parse_ratio(ratio)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)

    ckpt = open_checkpoint(source, config)
    family = family_for(getattr(ckpt.config, "model_type", None), ckpt.config_file)
    family.check(ckpt.config)
    ckpt.notes.extend(family.notes(ckpt.config))
    check_weights(ckpt)

    num_layers = ckpt.config.num_hidden_layers
    selector_model, options = None, dict(select_options or {})
    if method not in ("layers", "uniform"):
        selector_model = _ConfigOnly(ckpt.config)
        if needs_weights(get_selector(method)):
            selector_model = load_source_model(ckpt)
            options.setdefault("tokenizer", source_tokenizer(ckpt))
            options.setdefault("progress", progress)
    sparse_layers = choose_sparse_layers(num_layers, ratio, layers, method, selector_model, **options)
    del selector_model
    layer_types = layer_types_from(num_layers, sparse_layers)
    hconfig = hybrid_config_from_source(
        ckpt.config, layer_types, hype=hype, output_gates=gates, **family.hybrid_options(ckpt.config)
    )
    out_dtype = DTYPES[dtype] if dtype else _source_dtype(ckpt)
    plan, from_source = plan_output(ckpt, family, hconfig, out_dtype)
    aligned = _aligned_students(students, hconfig, plan) if students is not None else {}

    with atomic_folder(output, force=force, inputs=inputs) as tmp:
        with ShardedSafetensorsWriter(tmp, plan, max_bytes) as writer:
            total = sum(spec.nbytes for spec in ckpt.specs.values())
            with tqdm(total=total, unit="B", unit_scale=True, desc="reading + writing weights",
                      disable=not progress) as bar:
                for name, tensor in ckpt.stream():
                    for out_name, out in hybrid_tensors(family, name, tensor, ckpt, hconfig):
                        writer.write(out_name, _cast(aligned.get(out_name, out), out_dtype))
                    bar.update(ckpt.specs[name].nbytes if name in ckpt.specs else 0)
                    del tensor
            for out_name, out in added_tensors(hconfig, from_source, out_dtype):
                writer.write(out_name, _cast(aligned.get(out_name, out), out_dtype))
            writer.finish()
        hconfig.conversion = {
            "source": ckpt.source, "source_format": ckpt.format, "family": family.model_type, "method": method,
            "ratio": None if method == "layers" else ratio, "hybridize_version": __version__,
            "aligned_students": str(students) if students is not None else None,
        }
        _write_config(tmp, hconfig, out_dtype)
        _write_generation_config(tmp, ckpt)
        _write_tokenizer(tmp, ckpt)
        copy_architecture(tmp)
        (tmp / "README.md").write_text(model_card(
            name=output.name, source=ckpt.source, source_format=ckpt.format, family=family.label,
            layer_types=hconfig.layer_types, method=method, ratio=None if method == "layers" else ratio, hype=hype,
            gates=gates, dtype=str(out_dtype).removeprefix("torch."), version=__version__,
            base_model=ckpt.source if ckpt.folder is not None and _is_hub_id(ckpt) else None,
        ))
    return ConvertResult(output, sparse_layers, num_layers, ckpt.source,
                         extras={"format": ckpt.format, "family": family.model_type, "notes": ckpt.notes},
                         method=method, checkpoint=ckpt)


def _aligned_students(path: str | Path, hconfig: HybridConfig, plan: dict) -> dict[str, torch.Tensor]:
    """The Lightning-layer tensors of a students file, checked against the planned output (names, shapes, gates)."""
    from safetensors import safe_open

    from ..select.alignment import load_student_tensors

    from safetensors import SafetensorError

    path = Path(path)
    lightning = [i for i, t in enumerate(hconfig.layer_types) if t == LIGHTNING]
    try:
        tensors = load_student_tensors(path, lightning)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"--students {path} is not a readable safetensors file ({str(e).splitlines()[0]}): "
                         "run `hybridize score` again to rewrite it") from None
    if "gates" in meta and (meta["gates"] == "True") != bool(hconfig.output_gates):
        flag = "--gates" if meta["gates"] == "True" else "--no-gates"
        raise ValueError(f"{path} holds students aligned with{'' if flag == '--gates' else 'out'} output gates: "
                         f"convert with {flag}")
    for name, tensor in tensors.items():
        spec = plan.get(name)
        if spec is None or tuple(spec.shape) != tuple(tensor.shape):
            raise ValueError(f"{path} does not fit this model ({name}: {tuple(tensor.shape)}): were the students "
                             f"aligned on this source?")
    if lightning and not tensors:
        raise ValueError(f"{path} holds no student for the Lightning layers {lightning}")
    return tensors


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


# ---------------------------------------------------------------------------------------------------------------------
# The source as a transformers model (samples; selection methods that score layers)
# ---------------------------------------------------------------------------------------------------------------------
def source_tokenizer(ckpt: Checkpoint):
    """The source's tokenizer, or None when it has none."""
    if ckpt.tokenizer is not None:
        return ckpt.tokenizer
    if ckpt.folder is None or not any(p.name.startswith("tokenizer") for p in ckpt.tokenizer_files()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt.folder)


def load_source_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
    """The source as a transformers causal LM, read from the same stream as the conversion (its tensors are checked
    against its config first, so a mismatch is a one-line error here too)."""
    from .default_model import model_from_state

    if ckpt.model is not None:
        return ckpt.model.to(dtype)
    check_weights(ckpt)
    state = {name: _cast(t, dtype) for name, t in ckpt.stream() if not _ignored(name)}
    model = model_from_state(ckpt.config, state, dtype=dtype)
    if ckpt.generation_config is not None:
        model.generation_config = ckpt.generation_config
    return model
