"""The student (hybrid) and the teacher (the source model, frozen) of a run, with the tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..convert.build import build_hybrid
from ..select.placement import layer_types_from, num_sparse_layers, parse_ratio, uniform_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_source(source: str, dtype=torch.float32):
    """A Llama-family transformers model and tokenizer: "default" (built-in SmolLM2-135M), a .gguf file, or a Hugging
    Face folder / hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "default":
        from ..convert.default_model import load_default_model

        model, tok = load_default_model()
    elif str(source).endswith(".gguf"):
        from ..convert.default_model import load_gguf

        if not Path(source).is_file():
            raise FileNotFoundError(f"model.source {source} not found")
        model, tok = load_gguf(source)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(source)
    return model.to(dtype).eval(), tok


def sparse_layers_for(num_layers: int, spec) -> list[int]:
    if spec.layers is not None:
        layer_types_from(num_layers, spec.layers)
        return sorted(set(spec.layers))
    s, l = parse_ratio(spec.ratio)
    return uniform_layers(num_layers, num_sparse_layers(num_layers, s, l))


def _own_storage(model) -> None:
    """build_hybrid reuses source tensors where it can; the student must not share memory with the teacher."""
    for p in model.parameters():
        p.data = p.data.clone()


def load_students(model, path: str) -> int:
    """Load aligned students (hybrid parameter names) with strict=False; returns how many tensors matched."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"model.students {path} not found")
    own = model.state_dict()
    found = {k: v for k, v in load_file(path).items() if k in own and own[k].shape == v.shape}
    if not found:
        raise ValueError(f"model.students {path}: no tensor matches this model's parameter names and shapes")
    model.load_state_dict(found, strict=False)
    return len(found)


def load_models(recipe, need_teacher: bool):
    """(student in float32, teacher or None, tokenizer, description)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = recipe.model
    teacher_source = recipe.teacher.source or spec.source
    source_model = tok = None
    if spec.converted is not None:
        if not Path(spec.converted).is_dir():
            raise FileNotFoundError(f"model.converted {spec.converted} is not a folder")
        student = AutoModelForCausalLM.from_pretrained(spec.converted, trust_remote_code=True, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(spec.converted)
        description = f"converted hybrid {spec.converted}"
    else:
        source_model, tok = load_source(spec.source)
        layers = sparse_layers_for(source_model.config.num_hidden_layers, spec)
        types = layer_types_from(source_model.config.num_hidden_layers, layers)
        student = build_hybrid(source_model, types, hype=spec.hype, output_gates=spec.gates,
                               lightning_decay=spec.lightning_decay)
        _own_storage(student)
        description = f"{spec.source} converted with sparse layers {layers}"
    if spec.students:
        n = load_students(student, spec.students)
        description += f", {n} aligned student tensors from {spec.students}"
    teacher = None
    if need_teacher:
        if teacher_source is None:
            raise ValueError("teacher.source: the stages use a teacher loss; set teacher.source or model.source")
        if source_model is None or teacher_source != spec.source:
            source_model, _ = load_source(teacher_source)
        teacher = source_model.to(DTYPES[recipe.teacher.dtype]).eval()
        teacher.requires_grad_(False)
    student.float().train()
    return student, teacher, tok, description
