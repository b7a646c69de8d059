"""Which parameters a stage trains: presets, glob patterns, or LoRA adapters (peft), merged back at the stage end."""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from ..arch.configuration_hybridize import LIGHTNING, SPARSE

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def is_new_parameter(name: str, config) -> bool:
    """Parameters that no source tensor provided: output gates, Lightning output norms, and Lightning q/k norms when
    the source had none (`config.qk_norm` False)."""
    m = _LAYER.search(name)
    if m is None:
        return False
    layer, rest = int(m.group(1)), m.group(2)
    if not rest.startswith("self_attn."):
        return False
    part = rest.split(".")[1]
    if part in ("z_proj", "g_proj", "o_norm"):
        return True
    return part in ("q_norm", "k_norm") and config.layer_types[layer] == LIGHTNING and not config.qk_norm


def mixer_kind(name: str, config) -> str | None:
    """The layer type (LIGHTNING or SPARSE) whose token mixer owns parameter `name`; None outside token mixers."""
    m = _LAYER.search(name)
    if m is None or not m.group(2).startswith("self_attn."):
        return None
    return config.layer_types[int(m.group(1))]


def is_lightning_parameter(name: str, config) -> bool:
    """Every parameter of a Lightning layer's token mixer (the layers that conversion rewrote)."""
    return mixer_kind(name, config) == LIGHTNING


def is_mixer_parameter(name: str) -> bool:
    """A token mixer's parameter (`layers.N.self_attn.*`, Lightning or sparse), LoRA-wrapped names included."""
    m = _LAYER.search(name)
    return m is not None and m.group(2).startswith("self_attn.")


def parameter_groups(model: nn.Module, lr: float, lr_outside_mixers: float | None) -> list[dict]:
    """The optimizer's groups of the trainable parameters: token mixers at `lr`, everything else at
    `lr_outside_mixers` (one group at `lr` when that is None or equal). Empty groups are left out."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if lr_outside_mixers is None or lr_outside_mixers == lr:
        return [{"params": [p for _, p in trained], "lr": lr}]
    groups = [{"params": [p for n, p in trained if is_mixer_parameter(n)], "lr": lr},
              {"params": [p for n, p in trained if not is_mixer_parameter(n)], "lr": lr_outside_mixers}]
    return [g for g in groups if g["params"]]


def select_trainable(model: nn.Module, trainable, where: str = "trainable") -> list[str]:
    """Set requires_grad per the preset ("new", "lightning", "sparse", "all") or glob patterns; return trained names.
    ("lora" is handled by `apply_lora`, which freezes the base model itself.)"""
    config = model.config
    names = [n for n, _ in model.named_parameters()]
    if isinstance(trainable, str):
        rule = {
            "all": lambda n: True,
            "new": lambda n: is_new_parameter(n, config),
            "lightning": lambda n: is_lightning_parameter(n, config),
            "sparse": lambda n: mixer_kind(n, config) == SPARSE,
        }.get(trainable)
        if rule is None:
            raise ValueError(f"{where}: unknown preset {trainable!r}; allowed: new, lightning, sparse, all, lora, or patterns")
    else:
        unused = [p for p in trainable if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unused:
            raise ValueError(f"{where}: pattern {unused[0]!r} matches no parameter (names look like {names[1]!r})")
        rule = lambda n: any(fnmatch.fnmatchcase(n, p) for p in trainable)  # noqa: E731
    chosen = []
    for n, p in model.named_parameters():
        p.requires_grad_(bool(rule(n)))
        if p.requires_grad:
            chosen.append(n)
    if not chosen:
        raise ValueError(f"{where}: {trainable!r} selects no parameter of this model")
    return chosen


def apply_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap with peft LoRA adapters on `lora.target_modules`; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("trainable: lora needs peft: pip install 'hybridize[lora]' (or pip install peft)") from None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none")
    return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights and return the plain model (no-op for a plain model)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
