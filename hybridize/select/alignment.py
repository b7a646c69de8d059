"""Stage-1 alignment for layer selection: one Lightning student per layer, all trained at once.

Each student is the layer's attention rebuilt as Lightning attention from the teacher's own weights (the conversion
rules of `hybridize.convert.build`). It reads the teacher's detached input to that layer's attention (the
input_layernorm output) and learns MSE(student output, teacher attention output). Only student parameters train.
Students are saved under the hybrid model's parameter names (`model.layers.{i}.self_attn.*`), so a converted hybrid
can load them directly for its Lightning layers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..arch.configuration_hybridize import LIGHTNING, HybridConfig
from ..arch.modeling_hybridize import LightningAttention
from ..convert.build import _LAYER_RE, added_tensors, hybrid_config_from_source, map_tensor
from .runner import LayerRunner, has_qk_norm

STUDENT_PREFIX = "model.layers.{}.self_attn."


def student_config(source_model, gates: bool = True) -> HybridConfig:
    """The config of an all-Lightning hybrid of the source's shape (the students' shape)."""
    layers = source_model.config.num_hidden_layers
    return hybrid_config_from_source(source_model.config, [LIGHTNING] * layers, output_gates=gates,
                                     qk_norm=has_qk_norm(source_model))


def init_students(source_model, gates: bool = True) -> nn.ModuleList:
    """One Lightning student per layer, initialised from the source's attention weights."""
    config = student_config(source_model, gates)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source_model.state_dict().items():
        if _LAYER_RE.match(name):
            for new_name, new_tensor in map_tensor(name, tensor, config):
                state[new_name] = new_tensor
    dtype = next(source_model.parameters()).dtype
    state.update(added_tensors(config, set(state), dtype))
    device = next(source_model.parameters()).device
    students = nn.ModuleList()
    for i in range(config.num_hidden_layers):
        prefix = STUDENT_PREFIX.format(i)
        student = LightningAttention(config, i).to(device=device, dtype=dtype)
        own = {k[len(prefix):]: v.detach().clone() for k, v in state.items() if k.startswith(prefix)}
        student.load_state_dict(own, strict=True)
        students.append(student)
    return students


def students_state_dict(students: nn.ModuleList) -> dict[str, torch.Tensor]:
    return {STUDENT_PREFIX.format(i) + k: v.detach().contiguous().cpu()
            for i, s in enumerate(students) for k, v in s.state_dict().items()}


def save_students(students: nn.ModuleList, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file(students_state_dict(students), str(path), metadata=metadata or {})
    return path


def load_student_tensors(path: str | Path, layers: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Student tensors (hybrid names) from a students.safetensors file, optionally only for some layers."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `hybridize score` first (it writes students.safetensors)")
    tensors = load_file(str(path))
    if layers is None:
        return tensors
    keep = tuple(STUDENT_PREFIX.format(i) for i in layers)
    return {k: v for k, v in tensors.items() if k.startswith(keep)}


def read_aligned_students(path: str | Path, expected: dict[str, tuple[int, ...]], layer_types: list[str], gates: bool,
                          *, what: str, fix_gates) -> dict[str, torch.Tensor]:
    """The Lightning-layer tensors of a students file, checked against the hybrid they go into: readable, aligned with
    the same output gates, each tensor a name of `expected` with its shape, and some for the Lightning layers.
    `what` names the option in messages; `fix_gates(file_has_gates)` says how to match the file's gates."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    lightning = [i for i, t in enumerate(layer_types) if t == LIGHTNING]
    try:
        tensors = load_student_tensors(path, lightning)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{what} {e}") from None
        raise ValueError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0]}): "
                         "run `hybridize score` again to rewrite it") from None
    if "gates" in meta and (meta["gates"] == "True") != bool(gates):
        has_gates = meta["gates"] == "True"
        raise ValueError(f"{path} holds students aligned with{'' if has_gates else 'out'} output gates: "
                         f"{fix_gates(has_gates)}")
    for name, tensor in tensors.items():
        shape = expected.get(name)
        if shape is None or tuple(shape) != tuple(tensor.shape):
            raise ValueError(f"{path} does not fit this model ({name}: {tuple(tensor.shape)}): were the students "
                             f"aligned on this source?")
    if lightning and not tensors:
        raise ValueError(f"{path} holds no student for the Lightning layers {lightning}")
    return tensors


@dataclass
class AlignSettings:
    steps: int = 48
    batch_size: int = 2
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup: int = 4
    calibrate: bool = True  # least-squares output scale before training (calibrate_output_scale)

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"alignment {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"alignment learning rates need 0 < min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")


@dataclass
class AlignResult:
    loss_curve: list[float] = field(default_factory=list)  # summed per-layer MSE per step
    relative_error: list[float] = field(default_factory=list)  # per layer, last step: MSE / mean(teacher output^2)
    initial_relative_error: list[float] = field(default_factory=list)  # first step, after calibration
    output_scale: list[float] = field(default_factory=list)  # calibration factors (1.0 when off)
    seconds: float = 0.0
    tokens: int = 0


@torch.no_grad()
def fit_output_norm(attention: LightningAttention, x: torch.Tensor, ctx, target: torch.Tensor,
                    per_channel: bool = False) -> float:
    """Set a Lightning layer's output-norm weight to the least-squares fit of its output to `target` (the teacher's
    attention output for the same input `x`); returns the relative error MSE / mean(target^2) after the fit.

    A fresh Lightning layer has no softmax normaliser: its output norm sets a unit RMS, while the teacher's attention
    output is an average of values, 3-30x smaller in SmolLM2 (more in other models). The layer's output is linear in
    the norm's weight w: out_t = W_o (m_t * w), m_t the normalised, gated activations. per_channel=False scales the
    current weight by one factor; per_channel=True solves for all of w ((W_o^T W_o) * (sum_t m_t m_t^T) w =
    sum_t m_t * (W_o^T a_t)). Either way the error on these tokens is at most what a layer that outputs nothing
    gets (relative error 1). With a window branch (config.lightning_window) the recurrent branch is fitted to the
    target minus the window branch's output, and the error is that of the whole layer."""
    weight = attention.o_norm.weight
    current = weight.detach().float().clone()
    captured = []
    hook = attention.o_proj.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    try:
        weight.fill_(1.0)
        attention(x, ctx)
        if attention.window:  # the window branch alone (recurrent branch off): the fit is to what it leaves over
            weight.zero_()
            attention(x, ctx)
    finally:
        hook.remove()
    m = captured[0].float().reshape(-1, current.numel())
    a = target.float().reshape(-1, target.shape[-1])
    if attention.o_proj.bias is not None:
        a = a - attention.o_proj.bias.float()
    W = attention.o_proj.weight.float()
    whole = a.pow(2).mean().clamp(min=1e-30)
    if attention.window:
        window = captured[1].float().reshape(-1, current.numel())
        m, a = m - window, a - window @ W.T
    if not current.abs().any():  # a branch that starts at zero: fit one scale of the plain norm
        current = torch.ones_like(current)
    if per_channel:
        gram = (W.T @ W) * (m.T @ m)
        ridge = 1e-6 * gram.diagonal().mean().clamp(min=1e-30)
        rhs = (m * (a @ W)).sum(0)
        fitted = torch.linalg.solve(gram + ridge * torch.eye(len(rhs), device=gram.device), rhs)
    else:
        out = (m * current) @ W.T
        fitted = current * (out * a).sum() / out.pow(2).sum().clamp(min=1e-30)
    weight.copy_(fitted.to(weight.dtype))
    return float(((m * fitted) @ W.T - a).pow(2).mean() / whole)


@torch.no_grad()
def calibrate_output_scale(runner: LayerRunner, students: nn.ModuleList, ids: torch.Tensor) -> list[float]:
    """Rescale each student's output norm by its least-squares factor against the teacher on one batch
    (fit_output_norm); returns the factors."""
    ctx = runner.context(ids)
    factors = []
    for student, (x, target) in zip(students, runner.attention_io(ids)):
        before = student.o_norm.weight.detach().float().clone()
        fit_output_norm(student, x, ctx, target)
        nz = before.abs() > 0
        factors.append(float((student.o_norm.weight.float()[nz] / before[nz]).mean()) if nz.any() else 1.0)
    return factors


@torch.no_grad()
def calibrate_lightning_outputs(hybrid, source_model, ids: torch.Tensor, per_channel: bool = True) -> dict[int, float]:
    """Fit every Lightning layer's output norm of a fresh conversion to its source layer's attention output on the
    token batch `ids` (B, T), each layer fed the source's own input to that layer (fit_output_norm). Returns
    {layer: relative error after the fit}."""
    from .runner import reference_hybrid

    runner = LayerRunner(reference_hybrid(source_model))
    ids = ids.to(runner.device)
    ctx = runner.context(ids)
    errors = {}
    for i, (x, target) in enumerate(runner.attention_io(ids)):
        if hybrid.config.layer_types[i] == LIGHTNING:
            errors[i] = fit_output_norm(hybrid.model.layers[i].self_attn, x, ctx, target, per_channel)
    return errors


def calibrate_on_plays(hybrid, source_model, tokenizer, seqs: int = 4, seq_len: int = 512) -> dict:
    """calibrate_lightning_outputs on `seqs` x `seq_len` tokens of the built-in plays (what convert and train use);
    returns a record of the fit: tokens, text, relative error per Lightning layer and their mean (None without
    Lightning layers)."""
    from .data import calibration_data

    data = calibration_data(tokenizer, train_seqs=seqs, heldout_seqs=0, seq_len=seq_len)
    errors = calibrate_lightning_outputs(hybrid, source_model, data.train)
    return {"tokens": int(data.train.numel()), "text": data.source,
            "relative_error": {str(i): round(e, 4) for i, e in errors.items()},
            "mean_relative_error": sum(errors.values()) / len(errors) if errors else None}


def _lr_at(step: int, s: AlignSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def align_students(runner: LayerRunner, students: nn.ModuleList, train_ids: torch.Tensor, settings: AlignSettings,
                   progress: bool = True) -> AlignResult:
    """Train every student against its layer's teacher attention output (batches cycle through `train_ids`)."""
    settings.validate()
    if train_ids.shape[0] == 0:
        raise ValueError("no alignment text: give at least one training sequence")
    start = time.perf_counter()
    params = [p for s in students for p in s.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    result = AlignResult()
    n = train_ids.shape[0]
    if settings.calibrate:
        first = train_ids[[j % n for j in range(settings.batch_size)]].to(runner.device)
        result.output_scale = calibrate_output_scale(runner, students, first)
    else:
        result.output_scale = [1.0] * len(students)
    students.train()
    bar = tqdm(range(settings.steps), desc="align students", disable=not progress)
    for step in bar:
        rows = [(step * settings.batch_size + j) % n for j in range(settings.batch_size)]
        ids = train_ids[rows].to(runner.device)
        ctx = runner.context(ids)
        io = runner.attention_io(ids)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, settings)
        opt.zero_grad(set_to_none=True)
        total, rel = 0.0, []
        for student, (x, target) in zip(students, io):
            out = student(x, ctx)
            loss = F.mse_loss(out.float(), target.float())
            loss.backward()  # per layer: students are independent, so only one layer's graph lives at a time
            total += loss.item()
            rel.append(loss.item() / max(target.float().pow(2).mean().item(), 1e-30))
        opt.step()
        if step == 0:
            result.initial_relative_error = rel
        result.relative_error = rel
        result.loss_curve.append(total)
        result.tokens += ids.numel()
        bar.set_postfix(mse=f"{total:.3g}")
    students.eval()
    for p in params:
        p.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result
