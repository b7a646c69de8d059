"""The Accelerate side of a run: the Accelerator (precision, trackers), and what the loop must do differently under
FSDP or DeepSpeed."""

from __future__ import annotations

from pathlib import Path

from .recipe import Recipe


def make_accelerator(recipe: Recipe, output: Path):
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


def is_fsdp(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("FSDP")


def is_deepspeed(accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def check_backend(accelerator, recipe: Recipe) -> None:
    """Refuse, before any model is loaded, what the recipe asks that this backend cannot run."""
    if is_deepspeed(accelerator):
        _check_deepspeed(accelerator, recipe)
    if any(s.trainable == "lora" for s in recipe.stages) and (is_fsdp(accelerator) or is_deepspeed(accelerator)):
        raise ValueError(f"{recipe.source_file}: trainable: lora is not supported under FSDP or DeepSpeed; run it on "
                         "one process or with DDP (accelerate launch without an FSDP/DeepSpeed config)")
    for k, s in enumerate(recipe.stages):
        if not s.cuda_graphs:
            continue
        where = f"{recipe.source_file}: stages[{k}].cuda_graphs"
        if accelerator.device.type != "cuda":
            raise ValueError(f"{where}: stage {s.name!r} runs on {accelerator.device.type}; CUDA graphs need a GPU: "
                             "set it false")
        if accelerator.num_processes > 1 or is_deepspeed(accelerator) or is_fsdp(accelerator):
            raise ValueError(f"{where}: stage {s.name!r} runs in {accelerator.num_processes} processes or under "
                             "DeepSpeed / FSDP, whose collectives a graph cannot hold: set it false")


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


def configure_deepspeed(accelerator, plan, stage, precision: str) -> None:
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
