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
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from ..arch.configuration_hybridize import LIGHTNING, SPARSE
from .backend import check_backend, configure_deepspeed, is_deepspeed, is_fsdp, make_accelerator
from .checkpoint import full_state_dict, list_checkpoints, load_weights, save_checkpoint, usable_checkpoint
from .data import RecallStream, build_corpus, make_batch
from .graphs import GraphedStudent
from .losses import IGNORE, cross_entropy_sum, hidden_mse_sum, kl_sum
from .models import load_models
from .params import apply_lora, merge_lora, parameter_groups, select_trainable
from .plan import (StagePlan, check_context, named_token_ids, note_document_reach, note_repetition_cut, plan_stage,
                   training_weights)
from .recipe import Recipe, RecipeError, StageSpec, fingerprint_difference, run_fingerprint
from .rundir import check_output_dir, created_by_this_run, remove_failed_run, trim_metrics
from .schedule import make_scheduler
from .state import RunState


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written first."""


class NonFiniteLossError(RuntimeError):
    pass


class StageDoesNotFit(ValueError):
    """A stage's micro-batch runs out of accelerator memory and the loop cannot make it smaller by itself."""


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
            return (teacher_hidden[i].detach().to(h.dtype).reshape(h.shape),) + tuple(args[1:])

        hooks.append(layer.register_forward_pre_hook(swap))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _no_mlp(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


@contextlib.contextmanager
def mixer_outputs(model, skip_mlp: bool):
    """While active, collects each decoder layer's token-mixer output (layer order; reshaped to one row of tokens, as
    the losses see them). With `skip_mlp` the MLP blocks add nothing and do not run: when every layer is fed the
    teacher's input and only mixer outputs are compared, nothing reads them."""
    outs, hooks, patched = [], [], []
    for layer in _decoder_layers(model):
        def keep(module, args, out):
            o = out[0] if isinstance(out, tuple) else out  # transformers' attention returns (output, weights)
            outs.append(o.reshape(1, -1, o.shape[-1]))

        hooks.append(layer.self_attn.register_forward_hook(keep))
        if skip_mlp:
            layer.mlp.forward = _no_mlp
            patched.append(layer.mlp)
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()
        for m in patched:
            del m.forward  # the class's forward again


@torch.no_grad()
def teacher_outputs(teacher, batch: dict, need_hidden: bool, need_logits: bool = True) -> SimpleNamespace:
    """The teacher's logits (and hidden states) for `batch`, shaped like the student's: one row of B*T tokens.

    The teacher (a transformers model, no cu_seqlens) sees packed documents through position ids that restart per
    document, from which transformers builds a block-diagonal causal mask. It runs on the batch's B rows of T tokens,
    not on the flat row: the mask and the attention then cover B*T^2 entries instead of (B*T)^2 (at 16 x 2048 the
    flat call spent 0.36 s per micro-batch in the masked attention alone on an H100, 16 times the work needed).
    Without `need_logits` only the last position's logits are computed (the hidden MSE needs no vocabulary)."""
    rows = batch.get("rows", 1)
    out = teacher(input_ids=batch["input_ids"].view(rows, -1), position_ids=batch["position_ids"].view(rows, -1),
                  output_hidden_states=need_hidden, use_cache=False, logits_to_keep=0 if need_logits else 1)

    return SimpleNamespace(logits=_one_row(out.logits),
                           hidden_states=tuple(_one_row(h) for h in out.hidden_states) if need_hidden else None)


def student_outputs(model, batch: dict, **kwargs) -> SimpleNamespace:
    """The student's logits and hidden states for `batch` as one row of B*T tokens: one call over the flat row with
    `cu_seqlens`, or, where the batch has none (joined documents), one call over its B rows, flattened."""
    if batch["cu_seqlens"] is not None:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                    use_cache=False, **kwargs)
        return SimpleNamespace(logits=out.logits, hidden_states=out.hidden_states)
    rows = batch["rows"]
    out = model(input_ids=batch["input_ids"].view(rows, -1), position_ids=batch["position_ids"].view(rows, -1),
                use_cache=False, **kwargs)
    hidden = tuple(_one_row(h) for h in out.hidden_states) if out.hidden_states is not None else None
    return SimpleNamespace(logits=_one_row(out.logits), hidden_states=hidden)


def _one_row(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, t.shape[-1])


def hidden_loss_layers(layer_types: list[str], which: str) -> list[int]:
    """Indices of the layers whose outputs enter the hidden MSE: "all", or only the "lightning" or "sparse" ones."""
    if which == "all":
        return list(range(len(layer_types)))
    kind = {"lightning": LIGHTNING, "sparse": SPARSE}[which]
    return [i for i, t in enumerate(layer_types) if t == kind]


def loss_parts(model, teacher, batch: dict, loss_spec, hidden_layers: list[int]) -> dict[str, tuple]:
    """{"hidden_mse"|"kl"|"ce": (sum, count)} for the terms with a non-zero weight."""
    need_hidden = loss_spec.hidden_mse > 0
    # An align stage (hidden MSE alone) skips the vocabulary projection of both models: at 64 x 512 tokens that is
    # two (32K x 49K) float32 logit tensors per micro-batch that no loss reads.
    need_logits = loss_spec.kl > 0 or loss_spec.ce > 0
    at_mixers = need_hidden and loss_spec.hidden_at == "mixer"
    parts = {}
    t_out = None
    if loss_spec.hidden_mse > 0 or loss_spec.kl > 0:
        with mixer_outputs(teacher, skip_mlp=False) if at_mixers else contextlib.nullcontext([]) as t_mix:
            t_out = teacher_outputs(teacher, batch, need_hidden, need_logits=loss_spec.kl > 0)
    swap = (teacher_inputs(model, t_out.hidden_states) if loss_spec.hidden_inputs == "teacher_inputs"
            else contextlib.nullcontext())
    with swap, mixer_outputs(model, skip_mlp=True) if at_mixers else contextlib.nullcontext([]) as s_mix:
        out = student_outputs(model, batch, output_hidden_states=need_hidden and not at_mixers,
                              logits_to_keep=0 if need_logits else 1)
    if at_mixers:  # hidden_mse_sum reads layer i at entry i + 1 and counts tokens from entry 0
        parts["hidden_mse"] = hidden_mse_sum((s_mix[0], *s_mix), (t_mix[0], *t_mix), hidden_layers)
    elif loss_spec.hidden_mse > 0:
        parts["hidden_mse"] = hidden_mse_sum(out.hidden_states, t_out.hidden_states, hidden_layers)
    if loss_spec.kl > 0:
        targets = batch["targets"]
        if loss_spec.kl_max_position is not None:
            targets = targets.masked_fill(batch["position_ids"] >= loss_spec.kl_max_position, IGNORE)
        parts["kl"] = kl_sum(out.logits, t_out.logits, targets, temperature=loss_spec.temperature,
                             direction=loss_spec.kl_direction)
    if loss_spec.ce > 0:
        parts["ce"] = cross_entropy_sum(out.logits, batch["targets"])
    return parts


def weighted(parts: dict, totals: dict, loss_spec) -> torch.Tensor:
    return sum(getattr(loss_spec, k) * s / max(float(totals[k]), 1.0) for k, (s, _) in parts.items())


def part_counts(batch: dict, loss_spec) -> dict[str, int]:
    counted = batch["counted"]
    out = {}
    if loss_spec.hidden_mse > 0:
        out["hidden_mse"] = int(batch["input_ids"].numel())
    if loss_spec.kl > 0:
        out["kl"] = counted if loss_spec.kl_max_position is None else batch["counted_kl"]
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
# The student between stages
# ---------------------------------------------------------------------------------------------------------------------
def _set_sparse(model, stage, default_dense_len: int) -> None:
    cfg = model.config
    if not stage.sparse:
        cfg.sparse_dense_len = 1 << 62  # plain causal attention at every length
    else:
        cfg.sparse_dense_len = stage.dense_len if stage.dense_len is not None else default_dense_len


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


def _student_for(run: _Run, k: int, stage: StageSpec, model):
    """The student as stage k trains it: its attention lengths, activation checkpointing and trainable parameters
    (LoRA adapters added)."""
    _set_sparse(model, stage, run.default_dense_len)
    if stage.gradient_checkpointing:
        _set_checkpointing(model, True)
    elif _checkpointing(model):
        _set_checkpointing(model, False)
    if stage.trainable == "lora":
        model.requires_grad_(False)
        model = apply_lora(model, stage.lora)
    else:
        select_trainable(model, stage.trainable, f"{run.recipe.source_file}: stages[{k}].trainable")
    model.train()
    return model


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every stage of a run shares."""

    recipe: Recipe
    acc: object
    output: Path
    state: RunState
    result: TrainResult
    teacher: object
    tokenizer: object
    corpus: object
    student_config: object
    default_dense_len: int  # the student's own sparse_dense_len, restored for the export
    checkpoint: Path | None  # the checkpoint this run resumed from
    on_step: object
    last_good: str | None = None  # the newest checkpoint written (named when a non-finite loss stops the run)
    stop: StopFlag | None = None
    separators: list = field(default_factory=list)  # each stage's document_separator token id, or None

    @property
    def main(self) -> bool:
        return self.acc.is_main_process


@dataclass
class _Stage:
    """One stage while it runs."""

    index: int
    spec: StageSpec
    plan: StagePlan
    pmodel: object  # the student prepared by Accelerate
    optimizer: object
    scheduler: object  # not prepared: one step per optimizer step
    stream: object
    eval_seqs: list
    hidden_layers: list[int]
    start: int  # the first step to run (past the checkpoint's when resuming inside this stage)
    bar: object
    t_last: float
    student: object = None  # what the losses call: the prepared model, or its CUDA-graphed forward (cuda_graphs)


def train(recipe: Recipe, *, resume: bool = False, accelerator=None, on_step=None, models=None) -> TrainResult:
    """Run every stage of `recipe`; returns the history and where the final model was written.

    `on_step(global_step, record)` is called on every process after each optimizer step (tests use it).
    `models`: (student, teacher or None, tokenizer, description) already loaded, instead of `load_models(recipe)`.
    A run that fails before its first checkpoint removes what it created in output.dir.
    """
    output = Path(recipe.output.dir)
    check_output_dir(output, recipe.source_file)
    created = created_by_this_run(output)
    try:
        run, model = _setup(recipe, output, resume=resume, accelerator=accelerator, on_step=on_step, models=models)
        state = run.state
        with StopFlag() as run.stop:
            for k, stage in enumerate(recipe.stages):
                if k > state.stage or (k == state.stage and not state.stage_done):
                    model = run_stage(run, k, stage, model)
        return export_run(run, model)
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:  # the main process wrote the files
            remove_failed_run(output, created)
        raise


def _setup(recipe: Recipe, output: Path, *, resume, accelerator, on_step, models) -> tuple[_Run, object]:
    """Everything before the first stage: the checkpoint to resume from, the accelerator (and seed), the models, the
    corpus, the run state and the output folder. Returns the run and the student."""
    fingerprint = run_fingerprint(recipe)
    ckpt, resumed, notes = _resume_point(recipe, output, resume, fingerprint)
    acc = accelerator or make_accelerator(recipe, output)
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    check_backend(acc, recipe)
    student, teacher, tokenizer, description = _models(recipe, acc, models)
    separators = named_token_ids(recipe, tokenizer)
    default_dense_len = student.config.sparse_dense_len
    with acc.main_process_first():
        corpus = build_corpus(recipe.data, tokenizer, recipe.seed, teacher=teacher,
                              teacher_key=str(recipe.teacher.source or recipe.model.source))
    note_repetition_cut(recipe, corpus, acc.is_main_process)
    note_document_reach(recipe, corpus, acc.is_main_process)
    state = RunState(description=description, recipe=fingerprint)
    if ckpt is not None:
        state = RunState.resumed(resumed, fingerprint)
        if state.stage_done:
            load_weights(student, ckpt)
        if acc.is_main_process:
            for note in notes:
                print(f"note: {note}", flush=True)
            print(f"resuming from {ckpt} (stage {state.stage}, step {state.step})", flush=True)
    if acc.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1, default=str))
        trim_metrics(output / "metrics.jsonl", state.global_step)  # steps after the checkpoint run (and log) again
    if acc.trackers:
        acc.init_trackers("hybridize", config={"stages": len(recipe.stages), "seed": recipe.seed})
    run = _Run(recipe, acc, output, state, TrainResult(output, None), teacher, tokenizer, corpus, student.config,
               default_dense_len, ckpt, on_step, last_good=str(ckpt) if ckpt else None, separators=separators)
    return run, student


def _resume_point(recipe: Recipe, output: Path, resume: bool, fingerprint: dict):
    """(checkpoint, its stored state, notes) to continue from; (None, None, []) for a fresh run."""
    if not resume and list_checkpoints(output):
        raise FileExistsError(f"output.dir {output} already holds checkpoints: pass --resume to continue that run "
                              f"or choose another output.dir")
    if not resume:
        return None, None, []
    ckpt, resumed, notes = usable_checkpoint(output)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: output.dir {output} holds no checkpoint to continue from: run "
                                "without --resume to start this run")
    if "recipe" in resumed:  # checkpoints written before the fingerprint existed cannot be compared
        diff = fingerprint_difference(resumed["recipe"], fingerprint)
        if diff:
            raise RecipeError(f"{recipe.source_file}: {diff}: the run in {output} was made with another recipe; "
                              "resume with the recipe that started it, or choose another output.dir")
    return ckpt, resumed, notes


def _models(recipe: Recipe, acc, models):
    """(student, teacher placed for this backend or None, tokenizer, description)."""
    need_teacher = recipe.needs_teacher()
    if models is None:
        with acc.main_process_first():  # the first process scores layers (model.select) once; the others read them
            models = load_models(recipe, need_teacher)
    student, teacher, tokenizer, description = models
    if need_teacher and teacher is None:
        raise ValueError("the recipe's stages need a teacher but none was given")
    check_context(recipe, teacher.config if teacher is not None else student.config, acc.is_main_process)
    if teacher is not None:
        teacher = acc.prepare_model(teacher, evaluation_mode=True) if recipe.teacher.shard else teacher.to(acc.device)
    return student, teacher, tokenizer, description


# ---------------------------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------------------------
def run_stage(run: _Run, k: int, spec: StageSpec, model):
    """Stage k from its first step (or the checkpoint's); returns the plain student it hands to the next stage."""
    st = prepare_stage(run, k, spec, model)
    for step in range(st.start, st.plan.steps):
        train_step(run, st, step)
    st.bar.close()
    return finish_stage(run, st)


def prepare_stage(run: _Run, k: int, spec: StageSpec, model) -> _Stage:
    recipe, acc, state = run.recipe, run.acc, run.state
    plan = plan_stage(spec, acc.num_processes, recipe.source_file, k)
    resuming_here = run.checkpoint is not None and k == state.stage and not state.stage_done
    model = _student_for(run, k, spec, model)
    run.result.trainable[spec.name] = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = parameter_groups(model, spec.lr, spec.lr_outside_mixers)
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay)
    if is_deepspeed(acc):
        configure_deepspeed(acc, plan, spec, recipe.precision)
    pmodel, optimizer = acc.prepare(model, optimizer)
    scheduler = make_scheduler(optimizer, spec, plan.steps)
    if resuming_here:
        acc.load_state(str(run.checkpoint))
        scheduler.load_state_dict(state.scheduler)
    stream = run.corpus.stream(spec.seq_len, recipe.seed * 1000 + k, training_weights(recipe, spec))
    if spec.recall > 0:
        stream = RecallStream(stream, spec.recall, spec.recall_span, recipe.seed * 1000 + k, spec.recall_min_gap,
                              spec.join_documents, spec.recall_cue)
    eval_seqs = run.corpus.eval_sequences(spec.seq_len, spec.eval_sequences)
    hidden_layers = hidden_loss_layers(acc.unwrap_model(pmodel).config.layer_types, spec.loss.hidden_layers)
    start = state.step if resuming_here else 0
    from tqdm.auto import tqdm

    bar = tqdm(total=plan.steps, initial=start, desc=f"{spec.name}", unit="step", dynamic_ncols=True,
               disable=not (run.main and recipe.logging.progress))
    student = pmodel
    if spec.cuda_graphs:  # check_backend refused it where it cannot run
        student = GraphedStudent(acc.unwrap_model(pmodel), pmodel,
                                 torch.bfloat16 if recipe.precision == "bf16" else None)
    return _Stage(k, spec, plan, pmodel, optimizer, scheduler, stream, eval_seqs, hidden_layers, start, bar,
                  time.perf_counter(), student)


def train_step(run: _Run, st: _Stage, step: int) -> dict:
    """One optimizer step of `global_batch_tokens` tokens: loss, update, log, then stop or checkpoint if due."""
    spec, state = st.spec, run.state
    comp = _forward_backward_in_memory(run, st, step)
    total_loss = sum(getattr(spec.loss, x) * v for x, v in comp.items())
    record = {"stage": spec.name, "step": step + 1, "global_step": state.global_step + 1, "loss": total_loss, **comp,
              "lr": st.scheduler.get_last_lr()[0]}
    _update(run, st, step, record)
    st.scheduler.step()
    state.global_step += 1
    state.tokens += spec.global_batch_tokens
    now = time.perf_counter()
    record["tokens"] = state.tokens
    record["tokens_per_s"] = spec.global_batch_tokens / max(now - st.t_last, 1e-9)
    st.t_last = now
    if step + 1 == st.plan.steps or (spec.eval_every and (step + 1) % spec.eval_every == 0):
        record.update(heldout_loss(run.acc, st.pmodel, st.eval_seqs, st.plan.micro_batch))
    _log(run, st, record)
    if run.on_step is not None:
        run.on_step(state.global_step, record)
    _stop_or_checkpoint(run, st, step)
    return record


def _step_batches(run: _Run, st: _Stage, step: int) -> list[dict]:
    """This process's micro-batches of the step: its contiguous share of the step's globally numbered sequences."""
    plan, acc = st.plan, run.acc
    base = step * plan.sequences_per_step + acc.process_index * plan.per_process
    return [make_batch([st.stream[base + j * plan.micro_batch + i] for i in range(plan.micro_batch)], acc.device,
                       join_documents=st.spec.join_documents, separator=run.separators[st.index],
                       kl_max_position=st.spec.loss.kl_max_position)
            for j in range(plan.accumulation)]


def _forward_backward_in_memory(run: _Run, st: _Stage, step: int) -> dict[str, float]:
    """forward_backward, halving the micro-batch each time it runs out of accelerator memory, so that a source larger
    than the recipe was written for still trains. The global batch stays, and with it the update (the losses are
    normalised by the global token count). Only a single process may do this: processes that shrink on their own
    would no longer meet in the same collectives."""
    while True:
        try:
            return forward_backward(run, st, _step_batches(run, st, step))
        except torch.OutOfMemoryError:
            plan, k = st.plan, st.index
            where = f"stage {st.spec.name!r} (stages[{k}])"
            if plan.micro_batch == 1:
                raise StageDoesNotFit(f"{where}: one sequence of {st.spec.seq_len} tokens per micro-batch runs out of "
                                      f"accelerator memory: set stages[{k}].gradient_checkpointing: true, or a shorter "
                                      "seq_len") from None
            if run.acc.num_processes > 1 or is_deepspeed(run.acc):
                raise StageDoesNotFit(f"{where}: micro-batch {plan.micro_batch} runs out of accelerator memory: set "
                                      f"stages[{k}].micro_batch_size to {_smaller_divisor(plan)} (a single process "
                                      "halves it by itself)") from None
        # out of the handler: the exception's frames, and the activations they hold, are released by now
        st.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        micro = _smaller_divisor(st.plan)
        if run.main:
            print(f"stage {st.spec.name!r}: micro-batch {st.plan.micro_batch} ran out of accelerator memory; "
                  f"continuing with {micro} (same global batch)", flush=True)
        st.plan = replace(st.plan, micro_batch=micro, accumulation=st.plan.per_process // micro)


def _smaller_divisor(plan: StagePlan) -> int:
    """The largest micro-batch below the current one that divides the process's sequences per step."""
    return next(m for m in range(plan.micro_batch // 2, 0, -1) if plan.per_process % m == 0)


def forward_backward(run: _Run, st: _Stage, batches: list[dict]) -> dict[str, float]:
    """Gradients of the step's loss, each term normalised by its global token count; returns each term's value."""
    acc, loss_spec = run.acc, st.spec.loss
    local = {}
    for b in batches:
        for key, n in part_counts(b, loss_spec).items():
            local[key] = local.get(key, 0) + n
    keys = sorted(local)
    totals = dict(zip(keys, _summed_over_processes(acc, [float(local[x]) for x in keys])))
    sums = torch.zeros(len(keys), dtype=torch.float64, device=acc.device)
    for j, b in enumerate(batches):
        last = j == len(batches) - 1
        with contextlib.nullcontext() if last else acc.no_sync(st.pmodel):
            parts = loss_parts(st.student, run.teacher, b, loss_spec, st.hidden_layers)
            loss = weighted(parts, totals, loss_spec) * acc.num_processes
            if is_deepspeed(acc):  # the engine: no second division by the accumulation count (the loss is already
                # this micro-batch's share of the step), and its update at the last micro-batch
                st.pmodel.set_gradient_accumulation_boundary(last)
                st.pmodel.backward(loss, scale_wrt_gas=False)
                st.pmodel.step()
            else:
                acc.backward(loss)
        sums += torch.stack([parts[x][0].detach().double() for x in keys])
    sums = acc.reduce(sums, "sum")
    return {x: float(sums[i]) / max(totals[x], 1.0) for i, x in enumerate(keys)}


def _summed_over_processes(acc, values: list[float]) -> list[float]:
    """Host numbers summed over the processes; with one process the numbers themselves, so that the host does not
    wait for the GPU (a device tensor read back waits for every step queued before it)."""
    if acc.num_processes == 1:
        return values
    return acc.reduce(torch.tensor(values, device=acc.device), "sum").tolist()


def _update(run: _Run, st: _Stage, step: int, record: dict) -> None:
    """The optimizer step, or (non-finite loss) no update: stop the run or mark the step skipped."""
    total_loss = record["loss"]
    if not math.isfinite(total_loss):
        st.optimizer.zero_grad(set_to_none=True)
        if run.recipe.on_nonfinite == "stop":
            raise NonFiniteLossError(
                f"non-finite loss ({total_loss}) at stage {st.spec.name!r} step {step + 1} (global step "
                f"{run.state.global_step + 1}); last good checkpoint: {run.last_good or 'none'}")
        record["skipped"] = True
        return
    if st.spec.grad_clip:
        gn = run.acc.clip_grad_norm_(st.pmodel.parameters(), st.spec.grad_clip)
        record["grad_norm"] = float(gn)
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)


def _log(run: _Run, st: _Stage, record: dict) -> None:
    run.result.history.append(record)
    if run.main:
        with open(run.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if run.acc.trackers:
            run.acc.log({x: v for x, v in record.items() if isinstance(v, (int, float))}, step=run.state.global_step)
        st.bar.set_postfix(loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_s']:.0f}")
        st.bar.update(1)
    if "heldout_loss" in record:
        run.result.evals.append(record)
        run.state.metrics = {x: record[x] for x in ("heldout_loss", "heldout_ppl") if x in record}


def _stop_or_checkpoint(run: _Run, st: _Stage, step: int) -> None:
    more = step + 1 < st.plan.steps  # the stage's last step is checkpointed by finish_stage
    # Every process must agree on stopping (a signal may reach only some of them).
    stop = _summed_over_processes(run.acc, [float(run.stop.signal is not None)])[0] > 0
    if stop and more:
        path = _save(run, st, step + 1, False)
        st.bar.close()
        raise TrainingInterrupted(f"interrupted at stage {st.spec.name!r} step {step + 1}; checkpoint {path} "
                                  "written: continue with --resume")
    every = run.recipe.output.checkpoint_every
    if every and (step + 1) % every == 0 and more:
        run.last_good = str(_save(run, st, step + 1, False))


def _save(run: _Run, st: _Stage, step: int, done: bool, weights=None) -> Path:
    saved = run.state.saved(stage=st.index, step=step, stage_done=done, scheduler=st.scheduler.state_dict())
    return save_checkpoint(run.acc, run.output, saved, full_state_dict=weights, keep_last=run.recipe.output.keep_last)


def finish_stage(run: _Run, st: _Stage):
    """Record the stage, fold LoRA back, save the full weights; returns a plain student for the next stage."""
    acc, spec, plan, state = run.acc, st.spec, st.plan, run.state
    state.stages = [s for s in state.stages if s["name"] != spec.name] + [_stage_record(spec, plan, state.metrics)]
    if is_fsdp(acc):
        weights = full_state_dict(acc, st.pmodel)
        run.last_good = str(_save(run, st, plan.steps, True, weights if run.main else {}))
        acc.free_memory()
        st.pmodel = st.optimizer = None  # the sharded model goes before the next stage's copy is built
        model = _fresh_student(run.student_config, Path(run.last_good))
    else:
        model = merge_lora(acc.unwrap_model(st.pmodel))
        weights = {n: t for n, t in model.state_dict().items()
                   if not (n == "lm_head.weight" and model.config.tie_word_embeddings)}
        run.last_good = str(_save(run, st, plan.steps, True, weights if run.main else {}))
        acc.free_memory()
    state.stage, state.step, state.stage_done = st.index, plan.steps, True
    return model


def _stage_record(spec: StageSpec, plan: StagePlan, metrics: dict) -> dict:
    """What the model card reports of a finished stage."""
    return {"name": spec.name, "seq_len": spec.seq_len, "steps": plan.steps,
            "tokens": plan.steps * spec.global_batch_tokens, "lr": spec.lr, "schedule": spec.schedule,
            "trainable": spec.trainable, "loss": {x: getattr(spec.loss, x) for x in ("hidden_mse", "kl", "ce")},
            "kl_direction": spec.loss.kl_direction, "temperature": spec.loss.temperature, "sparse": spec.sparse,
            **metrics}


# ---------------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------------
def export_run(run: _Run, model) -> TrainResult:
    """The trained model as a user loads it (output.dir/model, with its card; pushed when the recipe says so)."""
    recipe, result, state = run.recipe, run.result, run.state
    result.tokens, result.global_step = state.tokens, state.global_step
    model.config.sparse_dense_len = run.default_dense_len
    if _checkpointing(model):
        _set_checkpointing(model, False)
    model.requires_grad_(True)
    if run.main and recipe.output.export:
        result.model_dir = _export_folder(run, model)
    run.acc.wait_for_everyone()
    if run.acc.trackers:
        run.acc.end_training()
    result.model = model
    return result


def _export_folder(run: _Run, model) -> Path:
    from ..card import Training, model_card, write_card
    from ..export import save_hybrid

    recipe, state = run.recipe, run.state
    folder = run.output / "model"
    if recipe.output.dtype is not None:
        from ..common import DTYPES

        model.to(DTYPES[recipe.output.dtype])
    save_hybrid(model.eval(), folder, tokenizer=run.tokenizer, force=True)
    (folder / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1, default=str))
    write_card(folder, model_card(training=Training(state.description, state.stages, state.tokens, state.global_step,
                                                    state.metrics, recipe.data.sources)))
    if recipe.push_to_hub is not None:
        from ..hub import push_folder

        push_folder(folder, recipe.push_to_hub.repo_id, private=recipe.push_to_hub.private)
    return folder
