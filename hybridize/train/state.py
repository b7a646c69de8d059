"""Where a run stands. A checkpoint's trainer_state.json is this state as a mapping (same keys, same order), and a
resumed run reads it back from there."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RunState:
    stage: int = 0  # the stage of the last checkpoint
    step: int = 0  # optimizer steps done in that stage
    stage_done: bool = False  # that stage ended (its checkpoint holds full weights, no optimizer)
    global_step: int = 0
    tokens: int = 0
    scheduler: dict | None = None  # the stage's LR scheduler state (only needed to continue inside a stage)
    metrics: dict = field(default_factory=dict)  # latest held-out metrics
    stages: list[dict] = field(default_factory=list)  # one record per finished stage (for the model card)
    description: str = ""  # what the student was made from
    recipe: dict | None = None  # the run's fingerprint (train.recipe.run_fingerprint), compared on --resume

    @classmethod
    def resumed(cls, stored: dict, fingerprint: dict) -> RunState:
        """The state of a checkpoint, carrying this run's fingerprint (checkpoints from before the fingerprint
        existed lack it)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(stored, recipe=fingerprint).items() if k in known})

    def saved(self, **changes) -> dict:
        """The mapping a checkpoint stores, with `changes` (the checkpoint's own stage, step and scheduler)."""
        return {**dataclasses.asdict(self), **changes}
