"""The student (hybrid) and the teacher (the source model, frozen) of a run, with the tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..common import DTYPES
from ..convert.build import build_hybrid
from ..convert.source import open_source, require_tokenizer
from ..select.placement import layer_types_for, sparse_count, sparse_indices


def load_source(source: str, dtype=torch.float32):
    """A Llama-family transformers model and tokenizer from any source `hybridize convert` reads ("default": the
    built-in SmolLM2-135M), offline."""
    model, tok, label = open_source(source, dtype)
    return model, require_tokenizer(tok, label, "training needs its tokenizer")


def sparse_layers_for(source_model, spec, *, tokenizer=None, cache_dir: str | None = None, progress: bool = True,
                      log=print) -> list[int]:
    """The sparse layers of the student: `spec.layers`, or the ratio's count placed by `spec.select` (unset: convert's
    default placement for this source) through the same selector `convert --select` uses (a scoring method reads
    `spec.score_report`, or the report scored once per source and method: hybridize.select.cache, with `cache_dir` the
    recipe's data.cache_dir)."""
    from ..convert.converter import default_placement

    num_layers = source_model.config.num_hidden_layers
    method = spec.select or default_placement(sum(p.numel() for p in source_model.parameters()), tokenizer is not None)
    if spec.layers is not None or method == "uniform":
        return sparse_indices(layer_types_for(num_layers, spec.ratio, spec.layers))
    from ..select.registry import get_selector
    from ..select.selectors import window_cut

    cut = window_cut(spec.lightning_window, spec.lightning_sinks, spec.hype)
    try:
        return get_selector(method)(source_model, sparse_count(num_layers, spec.ratio),
                                    score_report=spec.score_report, tokenizer=tokenizer, cache_dir=cache_dir,
                                    progress=progress, log=log, **cut)
    except (OSError, ValueError) as e:
        if spec.score_report is None:
            raise
        raise type(e)(f"model.score_report: {e}") from None


def _own_storage(model) -> None:
    """build_hybrid reuses source tensors where it can; the student must not share memory with the teacher."""
    for p in model.parameters():
        p.data = p.data.clone()


def load_students(model, path: str) -> int:
    """Load aligned students (hybrid parameter names) into the Lightning layers, checked as `convert --students`
    checks them; returns how many tensors were loaded."""
    from ..select.alignment import read_aligned_students

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = read_aligned_students(path, expected, model.config.layer_types, model.config.output_gates,
                                  what="model.students",
                                  fix_gates=lambda has: f"set model.gates: {'true' if has else 'false'}")
    model.load_state_dict(found, strict=False)  # the students cover the Lightning attention only
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
        from ..arch import register_auto_classes
        from ..export import is_hybrid_folder

        register_auto_classes()  # the installed hybrid classes, never the folder's own copy of the modeling files
        if not is_hybrid_folder(spec.converted):
            raise ValueError(f"model.converted {spec.converted} is not a hybrid written by `hybridize convert`: give "
                             "the source as model.source instead")
        student = AutoModelForCausalLM.from_pretrained(spec.converted, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(spec.converted)
        description = f"converted hybrid {spec.converted}"
    else:
        source_model, tok = load_source(spec.source)
        layers = sparse_layers_for(source_model, spec, tokenizer=tok, cache_dir=recipe.data.cache_dir,
                                   progress=recipe.logging.progress)
        types = layer_types_for(source_model.config.num_hidden_layers, layers=layers)
        student = build_hybrid(source_model, types, hype=spec.hype, output_gates=spec.gates,
                               lightning_decay=spec.lightning_decay, lightning_kv_heads=spec.lightning_kv_heads,
                               sparse_query_log_scale=spec.sparse_query_log_scale,
                               lightning_window=spec.lightning_window, lightning_sinks=spec.lightning_sinks,
                               lightning_sink_reach=spec.lightning_sink_reach, rope_yarn=spec.rope_yarn)
        _own_storage(student)
        description = f"{spec.source} converted with sparse layers {layers}"
        if spec.calibrate and not spec.students:
            from ..select.alignment import calibrate_on_plays

            fit = calibrate_on_plays(student, source_model, tok)
            if fit["mean_relative_error"] is not None:
                description += (f", Lightning output norms fitted to the source on {fit['tokens']} tokens (relative "
                                f"error {fit['mean_relative_error']:.2f})")
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
