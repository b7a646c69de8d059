"""The plan of each stage: how its global batch splits over processes and micro-batches, which data mixture it
draws, and whether its sequences fit the source model's context. Derived from the recipe, checked when the loop
reaches the stage (it depends on the number of processes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..common import source_context
from .recipe import Recipe, RecipeError, StageSpec


@dataclass
class StagePlan:
    """How one stage's global batch splits across processes and micro-batches."""

    steps: int
    sequences_per_step: int  # global
    per_process: int
    micro_batch: int
    accumulation: int


def plan_stage(stage: StageSpec, world_size: int, file: str = "<recipe>", index: int = 0) -> StagePlan:
    seqs = stage.global_batch_tokens // stage.seq_len
    w = f"stages[{index}]"
    if seqs % world_size:
        raise RecipeError(f"{file}: {w}.global_batch_tokens: {seqs} sequences per step do not split over {world_size} "
                          "processes")
    per_process = seqs // world_size
    micro = min(stage.micro_batch_size, per_process)
    if per_process % micro:
        raise RecipeError(f"{file}: {w}.micro_batch_size: {per_process} sequences per process per step are not a "
                          f"multiple of {micro}")
    steps = stage.steps if stage.steps is not None else math.ceil(stage.tokens / stage.global_batch_tokens)
    return StagePlan(steps, seqs, per_process, micro, per_process // micro)


def training_weights(recipe: Recipe, stage: StageSpec) -> list[float] | None:
    """The stage's mixture over the training sources (data_weights lists every source, held-out ones included)."""
    if stage.data_weights is None:
        return None
    return [w for w, src in zip(stage.data_weights, recipe.data.sources) if not src.heldout]


def check_context(recipe: Recipe, config, main: bool) -> None:
    """Refuse a stage longer than the source's context unless it says past_source_context (then note it once)."""
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


def note_document_reach(recipe: Recipe, corpus, main: bool) -> list[str]:
    """A note for each stage whose sequences are more than twice as long as the documents that half of its tokens sit
    in: such a stage trains a context no longer than its documents, whatever its seq_len (packed documents never
    attend across a boundary). Printed by the main process; returned for callers and tests."""
    notes = []
    for stage in recipe.stages:
        if stage.join_documents:  # its documents read each other: the sequence is the context
            continue
        reach = corpus.document_reach(training_weights(recipe, stage))
        if 0 < reach < stage.seq_len // 2:
            notes.append(f"note: stage {stage.name!r} reads {stage.seq_len}-token sequences, but half of its tokens sit "
                         f"in documents of {reach} tokens or fewer, and attention never crosses a document boundary: "
                         "it trains little context past that (longer documents: more text per document, or "
                         "min_new_tokens on teacher sources, or join_documents)")
    return _printed(notes, main)


def note_repetition_cut(recipe: Recipe, corpus, main: bool) -> list[str]:
    """A note for each source cut where its text repeats itself (`max_repetition`): how much of it went. Printed by
    the main process; returned for callers and tests."""
    notes = []
    for i, (src, (removed, total)) in enumerate(zip(recipe.data.sources, corpus.repetition_cut)):
        if src.max_repetition is not None and total:
            notes.append(f"note: data.sources[{i}]: {removed:,} of {total:,} tokens ({removed / total:.1%}) cut "
                         f"where the text repeats itself (max_repetition {src.max_repetition:g})")
    return _printed(notes, main)


def _printed(notes: list[str], main: bool) -> list[str]:
    """`notes`, printed first by the main process."""
    if main:
        for note in notes:
            print(note, flush=True)
    return notes


def named_token_ids(recipe: Recipe, tokenizer) -> list[int | None]:
    """Every token a recipe names (the sources' `start_token`, the stages' `document_separator`) checked against the
    tokenizer before any sampling or training (one it does not know is a RecipeError naming its field); returns each
    stage's separator id, None where a stage has none."""
    vocab = tokenizer.get_vocab()

    def known(token, where):
        if token not in vocab:
            raise RecipeError(f"{where}: the tokenizer has no token {token!r} (its special tokens: "
                              f"{', '.join(map(repr, tokenizer.all_special_tokens)) or 'none'})")
        return vocab[token]

    for i, src in enumerate(recipe.data.sources):
        if src.start_token is not None:
            known(src.start_token, f"data.sources[{i}].start_token")
    return [None if s.document_separator is None else known(s.document_separator, f"stages[{i}].document_separator")
            for i, s in enumerate(recipe.stages)]
