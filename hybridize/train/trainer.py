"""The staged training loop (Accelerate): one process on a CPU, one GPU, or many GPUs under `accelerate launch`.

Per stage: choose trainable parameters, build AdamW + schedule, prepare with Accelerate, and run optimizer steps of
`global_batch_tokens` tokens each. A step's sequences are numbered globally (step * sequences_per_step + ...); process
r takes its contiguous share, so the union over processes, and thus the loss and the update, does not depend on the
number of processes. Losses are normalised once by the global count of tokens, so micro-batching changes nothing
either (up to float rounding). Under `accelerate launch` the same loop runs with DDP, FSDP (FSDP2) or DeepSpeed ZeRO
stages 1-2 (each stage builds its engine with that stage's micro-batch and accumulation; the engine updates at the last
micro-batch of a step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..arch.configuration_hybridize import LIGHTNING
from .checkpoint import (
    checkpoint_dir,
    full_state_dict,
    list_checkpoints,
    load_weights,
    save_checkpoint,
    usable_checkpoint,
)
from .data import build_corpus, make_batch
from .losses import IGNORE, cross_entropy_sum, hidden_mse_sum, kl_sum
from .models import load_models
from .params import apply_lora, merge_lora, select_trainable
from .recipe import Recipe, RecipeError, fingerprint_difference, plan_stage, run_fingerprint
from .schedule import make_scheduler


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first."""


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    history: list[dict] = field(default_factory=list)  # one entry per optimizer step (main process)
    evals: list[dict] = field(default_factory=list)
    tokens: int = 0
    global_step: int = 0
    model: object = None  # the trained model (plain, LoRA merged)
    trainable: dict = field(default_factory=dict)  # stage name -> names of the parameters it trained


# ---------------------------------------------------------------------------------------------------------------------
# Loss of one micro-batch
# ---------------------------------------------------------------------------------------------------------------------
def _decoder_layers(model):
    """The student's decoder layers, through Accelerate/peft wrappers."""
    for m in model.modules():
        layers = getattr(getattr(m, "model", None), "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and hasattr(m, "lm_head"):
            return layers
    raise ValueError("hidden_inputs: teacher_inputs needs a causal-LM model with model.layers")


@contextlib.contextmanager
def teacher_inputs(model, teacher_hidden):
    """While active, decoder layer i of `model` receives the teacher's hidden state entering layer i (detached)
    instead of its own, so each layer's output measures that layer alone. The forward still runs through the
    wrappers (DDP/FSDP hooks stay in place)."""
    hooks = []
    for i, layer in enumerate(_decoder_layers(model)):
        def swap(module, args, i=i):
            h = args[0]
            return (teacher_hidden[i].detach().to(h.dtype),) + tuple(args[1:])

        hooks.append(layer.register_forward_pre_hook(swap))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def teacher_outputs(teacher, batch: dict, need_hidden: bool) -> SimpleNamespace:
    """The teacher's logits (and hidden states) for `batch`, shaped like the student's: one row of B*T tokens.

    The teacher (a transformers model, no cu_seqlens) sees packed documents through position ids that restart per
    document, from which transformers builds a block-diagonal causal mask. It runs on the batch's B rows of T tokens,
    not on the flat row: the mask and the attention then cover B*T^2 entries instead of (B*T)^2 (at 16 x 2048 the
    flat call spent 0.36 s per micro-batch in the masked attention alone on an H100, 16 times the work needed)."""
    rows = batch.get("rows", 1)
    out = teacher(input_ids=batch["input_ids"].view(rows, -1), position_ids=batch["position_ids"].view(rows, -1),
                  output_hidden_states=need_hidden, use_cache=False)

    def flat(t):
        return t.reshape(1, -1, t.shape[-1])

    return SimpleNamespace(logits=flat(out.logits),
                           hidden_states=tuple(flat(h) for h in out.hidden_states) if need_hidden else None)


def loss_parts(model, teacher, batch: dict, loss_spec, hidden_layers: list[int]) -> dict[str, tuple]:
    """{"hidden_mse"|"kl"|"ce": (sum, count)} for the terms with a non-zero weight."""
    need_hidden = loss_spec.hidden_mse > 0
    parts = {}
    t_out = None
    if loss_spec.hidden_mse > 0 or loss_spec.kl > 0:
        t_out = teacher_outputs(teacher, batch, need_hidden)
    swap = (teacher_inputs(model, t_out.hidden_states) if loss_spec.hidden_inputs == "teacher_inputs"
            else contextlib.nullcontext())
    with swap:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                    output_hidden_states=need_hidden, use_cache=False)
    if loss_spec.hidden_mse > 0:
        parts["hidden_mse"] = hidden_mse_sum(out.hidden_states, t_out.hidden_states, hidden_layers)
    if loss_spec.kl > 0:
        parts["kl"] = kl_sum(out.logits, t_out.logits, batch["targets"], temperature=loss_spec.temperature,
                             direction=loss_spec.kl_direction)
    if loss_spec.ce > 0:
        parts["ce"] = cross_entropy_sum(out.logits, batch["targets"])
    return parts


def weighted(parts: dict, totals: dict, loss_spec) -> torch.Tensor:
    return sum(getattr(loss_spec, k) * s / max(float(totals[k]), 1.0) for k, (s, _) in parts.items())


def part_counts(batch: dict, loss_spec) -> dict[str, int]:
    counted = int((batch["targets"] != IGNORE).sum())
    out = {}
    if loss_spec.hidden_mse > 0:
        out["hidden_mse"] = int(batch["input_ids"].numel())
    if loss_spec.kl > 0:
        out["kl"] = counted
    if loss_spec.ce > 0:
        out["ce"] = counted
    return out


@torch.no_grad()
def heldout_loss(accelerator, model, sequences, micro: int) -> dict:
    """Mean next-token cross-entropy (and perplexity) of `model` on held-out packed sequences (all processes)."""
    if not sequences:
        return {}
    W = accelerator.num_processes
    usable = len(sequences) - len(sequences) % W
    if usable == 0:  # fewer held-out sequences than processes
        return {}
    mine = sequences[accelerator.process_index : usable : W]
    was_training = model.training
    model.eval()
    # The same plain PyTorch code the training steps run: no torch.compile of the inference-only fused pieces
    # (compilation time) inside a training run.
    config = getattr(accelerator.unwrap_model(model), "config", None)
    fused = getattr(config, "fused_elementwise", None)
    if fused:
        config.fused_elementwise = False
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    try:
        for i in range(0, len(mine), micro):
            batch = make_batch(mine[i : i + micro], accelerator.device)
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        cu_seqlens=batch["cu_seqlens"], use_cache=False)
            s, n = cross_entropy_sum(out.logits, batch["targets"])
            total += torch.stack([s.double(), n.double()])
    finally:
        model.train(was_training)
        if fused:
            config.fused_elementwise = fused
    total = accelerator.reduce(total, reduction="sum")
    loss = float(total[0] / total[1].clamp(min=1))
    return {"heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 50.0)), "heldout_tokens": int(total[1])}


# ---------------------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------------------
class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (the handler itself does nothing else)."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def _make_accelerator(recipe: Recipe, output: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = []
    for name in recipe.logging.trackers:
        try:
            __import__({"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(name, name))
            trackers.append(name)
        except ImportError:
            pass
    mixed = "bf16" if recipe.precision == "bf16" else "no"
    return Accelerator(mixed_precision=mixed, log_with=trackers or None,
                       project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")))


def _is_fsdp(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def _is_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def _check_deepspeed(accelerator, recipe: Recipe) -> None:
    """What this loop can run under DeepSpeed: ZeRO stages 0-2 (whole parameters on every process), a replicated
    teacher, and `on_nonfinite: stop` (the engine applies the update inside the last micro-batch's backward, so a
    non-finite step cannot be skipped)."""
    zero = accelerator.state.deepspeed_plugin.zero_stage
    if zero == 3:
        raise ValueError("DeepSpeed ZeRO-3 shards the parameters, which the stage-end export needs whole: use ZeRO "
                         "stage 1 or 2, or FSDP (recipes/accelerate/fsdp.yaml) to shard parameters")
    if recipe.on_nonfinite == "skip":
        raise ValueError(f"{recipe.source_file}: on_nonfinite: skip cannot work under DeepSpeed (its engine applies "
                         "the update inside backward); set on_nonfinite: stop")
    if recipe.teacher.shard:
        raise ValueError(f"{recipe.source_file}: teacher.shard works under FSDP only; under DeepSpeed every process "
                         "holds the frozen teacher: set teacher.shard: false")


def _configure_deepspeed(accelerator, plan, stage, precision: str) -> None:
    """The engine of each stage: its micro-batch, accumulation and clipping; fp32 parameters as on every other path,
    with bf16 as torch.autocast inside the engine (`torch_autocast`) rather than DeepSpeed's bf16 parameters, so that
    the weights each stage hands on and exports stay float32."""
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    cfg.update({
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.micro_batch * plan.accumulation * accelerator.num_processes,
        "gradient_clipping": float(stage.grad_clip or 0.0),
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
    })
    accelerator.gradient_accumulation_steps = plan.accumulation  # what Accelerate compares the engine's value with


def _set_sparse(model, stage, default_dense_len: int) -> None:
    cfg = model.config
    if not stage.sparse:
        cfg.sparse_dense_len = 1 << 62  # plain causal attention at every length
    else:
        cfg.sparse_dense_len = stage.dense_len if stage.dense_len is not None else default_dense_len


def _training_weights(recipe: Recipe, stage) -> list[float] | None:
    """The stage's mixture over the training sources (data_weights lists every source, held-out ones included)."""
    if stage.data_weights is None:
        return None
    return [w for w, src in zip(stage.data_weights, recipe.data.sources) if not src.heldout]


def _trim_metrics(path: Path, upto: int) -> None:
    if not path.is_file():
        return
    keep = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["global_step"] <= upto]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def _checkpointing(model) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", None) if hasattr(type(model), "is_activation_checkpointing")
                else model.is_gradient_checkpointing)


def _set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing (non-reentrant) on or off; transformers renamed the methods during 5.x."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _fresh_student(config, checkpoint: Path):
    from ..arch.modeling_hybridize import HybridForCausalLM

    model = HybridForCausalLM(config)
    load_weights(model, checkpoint)
    return model.float().train()


def _check_output_dir(output: Path, file: str) -> None:
    """Fail before any work when output.dir cannot be created or written (under a file, read-only, no permission)."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RecipeError(f"{file}: output.dir: {output} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"{file}: output.dir: {existing} is not writable (read-only or no permission): choose "
                          "another output.dir")


def source_context(config) -> int | None:
    """How many positions the source model was trained for: max_position_embeddings, or the length its RoPE
    scaling reaches when that is longer (yarn/linear/dynamic configs keep the original length there)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not limit:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    factor = rope.get("factor") if isinstance(rope, dict) else None
    if factor and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        limit = max(limit, int(rope.get("original_max_position_embeddings", limit) * float(factor)))
    return int(limit)


def _check_context(recipe: Recipe, config, main: bool) -> None:
    limit = source_context(config)
    if limit is None:
        return
    past = [(k, s) for k, s in enumerate(recipe.stages) if s.seq_len > limit]
    for k, s in past:
        if not s.past_source_context:
            raise RecipeError(f"{recipe.source_file}: stages[{k}].seq_len: {s.seq_len} is past the source model's "
                              f"context ({limit} positions): lower it, or set stages[{k}].past_source_context: true "
                              "to train a longer context on purpose")
    if past and main:
        names = ", ".join(f"{s.name!r} ({s.seq_len})" for _, s in past)
        print(f"note: stages {names} train past the source model's context of {limit} positions "
              "(past_source_context: true)", flush=True)


def _created_by_this_run(output: Path) -> list[Path]:
    """What a run may create in output.dir that is not there yet (the folder itself when it does not exist)."""
    if not output.exists():
        return [output]
    return [p for p in (output / "recipe.json", output / "metrics.jsonl", output / "logs", checkpoint_dir(output))
            if not p.exists()]


def _remove_failed_run(output: Path, created: list[Path]) -> None:
    """After a failure before the first checkpoint, what the run created holds nothing to resume from: remove it,
    and only it (a folder that existed before stays)."""
    if list_checkpoints(output):
        return
    for path in created:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def train(recipe: Recipe, *, resume: bool = False, accelerator=None, on_step=None, models=None) -> TrainResult:
    """Run every stage of `recipe`; returns the history and where the final model was written.

    `on_step(global_step, record)` is called on every process after each optimizer step (tests use it).
    `models`: (student, teacher or None, tokenizer, description) already loaded, instead of `load_models(recipe)`.
    A run that fails before its first checkpoint removes what it created in output.dir.
    """
    output = Path(recipe.output.dir)
    _check_output_dir(output, recipe.source_file)
    created = _created_by_this_run(output)
    try:
        return _train(recipe, output, resume=resume, accelerator=accelerator, on_step=on_step, models=models)
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:  # the main process wrote the files
            _remove_failed_run(output, created)
        raise


def _train(recipe: Recipe, output: Path, *, resume, accelerator, on_step, models) -> TrainResult:
    if not resume and list_checkpoints(output):
        raise FileExistsError(f"output.dir {output} already holds checkpoints: pass --resume to continue that run "
                              f"or choose another output.dir")
    fingerprint = run_fingerprint(recipe)
    ckpt = resumed = None
    notes: list[str] = []
    if resume:
        ckpt, resumed, notes = usable_checkpoint(output)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: output.dir {output} holds no checkpoint to continue from: run "
                                    "without --resume to start this run")
        if "recipe" in resumed:  # checkpoints written before the fingerprint existed cannot be compared
            diff = fingerprint_difference(resumed["recipe"], fingerprint)
            if diff:
                raise RecipeError(f"{recipe.source_file}: {diff}: the run in {output} was made with another recipe; "
                                  "resume with the recipe that started it, or choose another output.dir")
    acc = accelerator or _make_accelerator(recipe, output)
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    main = acc.is_main_process
    deepspeed = _is_deepspeed(acc)
    if deepspeed:
        _check_deepspeed(acc, recipe)
    if any(s.trainable == "lora" for s in recipe.stages) and (_is_fsdp(acc) or deepspeed):
        raise ValueError(f"{recipe.source_file}: trainable: lora is not supported under FSDP or DeepSpeed; run it on "
                         "one process or with DDP (accelerate launch without an FSDP/DeepSpeed config)")

    need_teacher = recipe.needs_teacher()
    student, teacher, tokenizer, description = models if models is not None else load_models(recipe, need_teacher)
    if need_teacher and teacher is None:
        raise ValueError("the recipe's stages need a teacher but none was given")
    _check_context(recipe, teacher.config if teacher is not None else student.config, main)
    default_dense_len = student.config.sparse_dense_len
    if teacher is not None:
        teacher = acc.prepare_model(teacher, evaluation_mode=True) if recipe.teacher.shard else teacher.to(acc.device)
    with acc.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer, recipe.seed, teacher=teacher,
                              teacher_key=str(recipe.teacher.source or recipe.model.source))

    state = {"stage": 0, "step": 0, "stage_done": False, "global_step": 0, "tokens": 0, "scheduler": None,
             "metrics": {}, "stages": [], "description": description, "recipe": fingerprint}
    if ckpt is not None:
        state = dict(resumed, recipe=fingerprint)
        if state["stage_done"]:
            load_weights(student, ckpt)
        if main:
            for note in notes:
                print(f"note: {note}", flush=True)
            print(f"resuming from {ckpt} (stage {state['stage']}, step {state['step']})", flush=True)
    metrics_file = output / "metrics.jsonl"
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1, default=str))
        _trim_metrics(metrics_file, state["global_step"])  # steps after the checkpoint will be run (and logged) again
    if acc.trackers:
        acc.init_trackers("hybridize", config={"stages": len(recipe.stages), "seed": recipe.seed})
    result = TrainResult(output, None, tokens=state["tokens"], global_step=state["global_step"])
    last_good = str(ckpt) if ckpt else None
    model = student

    with StopFlag() as stop:
        for k, stage in enumerate(recipe.stages):
            if k < state["stage"] or (k == state["stage"] and state["stage_done"]):
                continue
            plan = plan_stage(stage, acc.num_processes, recipe.source_file, k)
            resuming_here = ckpt is not None and k == state["stage"] and not state["stage_done"]
            start = state["step"] if resuming_here else 0

            _set_sparse(model, stage, default_dense_len)
            if stage.gradient_checkpointing:
                _set_checkpointing(model, True)
            elif _checkpointing(model):
                _set_checkpointing(model, False)
            if stage.trainable == "lora":
                model.requires_grad_(False)
                model = apply_lora(model, stage.lora)
            else:
                select_trainable(model, stage.trainable, f"{recipe.source_file}: stages[{k}].trainable")
            model.train()
            result.trainable[stage.name] = [n for n, p in model.named_parameters() if p.requires_grad]
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=tuple(stage.betas),
                                          weight_decay=stage.weight_decay)
            if deepspeed:
                _configure_deepspeed(acc, plan, stage, recipe.precision)
            pmodel, optimizer = acc.prepare(model, optimizer)
            scheduler = make_scheduler(optimizer, stage, plan.steps)  # not prepared: one step per optimizer step
            if resuming_here:
                acc.load_state(str(ckpt))
                scheduler.load_state_dict(state["scheduler"])
            stream = corpus.stream(stage.seq_len, recipe.seed * 1000 + k, _training_weights(recipe, stage))
            eval_seqs = corpus.eval_sequences(stage.seq_len, stage.eval_sequences)
            hidden_layers = list(range(model.config.num_hidden_layers)) if stage.loss.hidden_layers == "all" else [
                i for i, t in enumerate(acc.unwrap_model(pmodel).config.layer_types) if t == LIGHTNING]

            def checkpoint(step: int, done: bool, weights=None) -> Path:
                st = dict(state, stage=k, step=step, stage_done=done, scheduler=scheduler.state_dict(),
                          global_step=result.global_step, tokens=result.tokens)
                return save_checkpoint(acc, output, st, full_state_dict=weights, keep_last=recipe.output.keep_last)

            from tqdm.auto import tqdm

            bar = tqdm(total=plan.steps, initial=start, desc=f"{stage.name}", unit="step", dynamic_ncols=True,
                       disable=not (main and recipe.logging.progress))
            t_last = time.perf_counter()
            for step in range(start, plan.steps):
                base = step * plan.sequences_per_step + acc.process_index * plan.per_process
                batches = []
                for j in range(plan.accumulation):
                    seqs = [stream[base + j * plan.micro_batch + i] for i in range(plan.micro_batch)]
                    batches.append(make_batch(seqs, acc.device))
                local = {}
                for b in batches:
                    for key, n in part_counts(b, stage.loss).items():
                        local[key] = local.get(key, 0) + n
                keys = sorted(local)
                totals_t = acc.reduce(torch.tensor([float(local[x]) for x in keys], device=acc.device), "sum")
                totals = dict(zip(keys, totals_t.tolist()))
                sums = torch.zeros(len(keys), dtype=torch.float64, device=acc.device)
                for j, b in enumerate(batches):
                    sync = contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(pmodel)
                    with sync:
                        parts = loss_parts(pmodel, teacher, b, stage.loss, hidden_layers)
                        loss = weighted(parts, totals, stage.loss) * acc.num_processes
                        if deepspeed:  # the engine: no second division by the accumulation count (the loss is
                            # already this micro-batch's share of the step), and its update at the last micro-batch
                            pmodel.set_gradient_accumulation_boundary(j == len(batches) - 1)
                            pmodel.backward(loss, scale_wrt_gas=False)
                            pmodel.step()
                        else:
                            acc.backward(loss)
                    sums += torch.stack([parts[x][0].detach().double() for x in keys])
                sums = acc.reduce(sums, "sum")
                comp = {x: float(sums[i]) / max(totals[x], 1.0) for i, x in enumerate(keys)}
                total_loss = sum(getattr(stage.loss, x) * v for x, v in comp.items())
                record = {"stage": stage.name, "step": step + 1, "global_step": result.global_step + 1,
                          "loss": total_loss, **comp, "lr": scheduler.get_last_lr()[0]}
                if not math.isfinite(total_loss):
                    optimizer.zero_grad(set_to_none=True)
                    if recipe.on_nonfinite == "stop":
                        raise NonFiniteLossError(
                            f"non-finite loss ({total_loss}) at stage {stage.name!r} step {step + 1} (global step "
                            f"{result.global_step + 1}); last good checkpoint: {last_good or 'none'}")
                    record["skipped"] = True
                else:
                    if stage.grad_clip:
                        gn = acc.clip_grad_norm_(pmodel.parameters(), stage.grad_clip)
                        record["grad_norm"] = float(gn)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                result.global_step += 1
                result.tokens += stage.global_batch_tokens
                now = time.perf_counter()
                record["tokens"] = result.tokens
                record["tokens_per_s"] = stage.global_batch_tokens / max(now - t_last, 1e-9)
                t_last = now
                if stage.eval_every and (step + 1) % stage.eval_every == 0 and step + 1 < plan.steps:
                    record.update(heldout_loss(acc, pmodel, eval_seqs, plan.micro_batch))
                if step + 1 == plan.steps:
                    record.update(heldout_loss(acc, pmodel, eval_seqs, plan.micro_batch))
                result.history.append(record)
                if main:
                    with open(metrics_file, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if acc.trackers:
                        acc.log({x: v for x, v in record.items() if isinstance(v, (int, float))},
                                step=result.global_step)
                    bar.set_postfix(loss=f"{total_loss:.4g}", tok_s=f"{record['tokens_per_s']:.0f}")
                    bar.update(1)
                if "heldout_loss" in record:
                    result.evals.append(record)
                    state["metrics"] = {x: record[x] for x in ("heldout_loss", "heldout_ppl") if x in record}
                if on_step is not None:
                    on_step(result.global_step, record)
                # Every process must agree on stopping (a signal may reach only some of them).
                flag = acc.reduce(torch.tensor([1.0 if stop.signal else 0.0], device=acc.device), "sum")
                if float(flag) > 0 and step + 1 < plan.steps:
                    path = checkpoint(step + 1, False)
                    bar.close()
                    raise TrainingInterrupted(f"interrupted at stage {stage.name!r} step {step + 1}; checkpoint "
                                              f"{path} written: continue with --resume")
                every = recipe.output.checkpoint_every
                if every and (step + 1) % every == 0 and step + 1 < plan.steps:
                    last_good = str(checkpoint(step + 1, False))
            bar.close()

            # Stage end: fold LoRA back, save full weights, start the next stage from a plain model.
            state["stages"] = [s for s in state["stages"] if s["name"] != stage.name] + [{
                "name": stage.name, "seq_len": stage.seq_len, "steps": plan.steps,
                "tokens": plan.steps * stage.global_batch_tokens, "lr": stage.lr, "schedule": stage.schedule,
                "trainable": stage.trainable, "loss": {x: getattr(stage.loss, x) for x in ("hidden_mse", "kl", "ce")},
                "kl_direction": stage.loss.kl_direction, "temperature": stage.loss.temperature, "sparse": stage.sparse,
                **state["metrics"]}]
            if _is_fsdp(acc):
                weights = full_state_dict(acc, pmodel)
                last_good = str(checkpoint(plan.steps, True, weights if main else {}))
                acc.free_memory()
                del pmodel, optimizer
                model = _fresh_student(student.config, Path(last_good))
            else:
                model = merge_lora(acc.unwrap_model(pmodel))
                weights = {n: t for n, t in model.state_dict().items()
                           if not (n == "lm_head.weight" and model.config.tie_word_embeddings)}
                last_good = str(checkpoint(plan.steps, True, weights if main else {}))
                acc.free_memory()
            state.update(stage=k, step=plan.steps, stage_done=True)

    model.config.sparse_dense_len = default_dense_len
    if _checkpointing(model):
        _set_checkpointing(model, False)
    model.requires_grad_(True)
    if main and recipe.output.export:
        from ..card import Training, model_card, write_card
        from ..export import save_hybrid

        folder = output / "model"
        if recipe.output.dtype is not None:
            from ..common import DTYPES

            model.to(DTYPES[recipe.output.dtype])
        save_hybrid(model.eval(), folder, tokenizer=tokenizer, force=True)
        (folder / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1, default=str))
        write_card(folder, model_card(training=Training(
            state.get("description", ""), state.get("stages", []), result.tokens, result.global_step,
            state.get("metrics") or {}, recipe.data.sources)))
        result.model_dir = folder
        if recipe.push_to_hub is not None:
            from ..hub import push_folder

            push_folder(folder, recipe.push_to_hub.repo_id, private=recipe.push_to_hub.private)
    acc.wait_for_everyone()
    if acc.trackers:
        acc.end_training()
    result.model = model
    return result
