"""The student's forward and backward replayed from CUDA graphs, for stages whose batches all have one shape.

A SmolLM2-sized hybrid at 2K tokens launches about 4,000 kernels a training step, and the host issuing them takes
longer than the GPU running them (H200, 2026-12-02: a step of 16K tokens took 141 ms, its kernels 99 ms;
bench/results/training.md).
Recorded once as CUDA graphs (`torch.cuda.make_graphed_callables`), a micro-batch's forward and backward are two
launches. Only where nothing can change between replays: joined documents (no cu_seqlens, a fixed (rows, seq_len)),
logits only (no hidden states), one CUDA process, no DeepSpeed or FSDP wrapper. A batch of another shape (the
micro-batch halved after running out of memory) runs eagerly.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class _Logits(nn.Module):
    """The student's logits for (rows, seq_len) ids and positions under autocast without its weight cache (a graph
    cannot hold one); the class's forward, not an instance's wrapped one (Accelerate wraps it in its own autocast)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, input_ids, position_ids):
        with torch.autocast("cuda", dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                            cache_enabled=False):
            out = type(self.model).forward(self.model, input_ids=input_ids, position_ids=position_ids,
                                           use_cache=False, logits_to_keep=0)
        return out.logits


class GraphedStudent:
    """Called as the trainer calls the student (`student_outputs`): the graphed forward for the shape it was recorded
    for, the eager model otherwise. Recorded at the first call, from that batch."""

    def __init__(self, model: nn.Module, eager, dtype: torch.dtype | None):
        self.module = _Logits(model, dtype)
        self.eager = eager  # the prepared model, for anything the graphs were not recorded for
        self.graphed = None
        self.shape = None

    def __call__(self, *, input_ids, position_ids, use_cache=False, output_hidden_states=False, logits_to_keep=0,
                 **kwargs):
        if output_hidden_states or logits_to_keep != 0 or kwargs.get("cu_seqlens") is not None or \
                (self.shape is not None and tuple(input_ids.shape) != self.shape):
            return self.eager(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache,
                              output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep, **kwargs)
        if self.graphed is None:
            self.shape = tuple(input_ids.shape)
            torch.cuda.synchronize()
            # allow_unused_input: a parameter no logit depends on (a frozen one, an unused norm) is not an error
            # the sample inputs become the graphs' static inputs, which every replay copies into: they must own
            # their memory (positions are often one row expanded over the batch, every row the same storage)
            static = tuple(t.clone(memory_format=torch.contiguous_format) for t in (input_ids, position_ids))
            self.graphed = torch.cuda.make_graphed_callables(self.module, static, allow_unused_input=True)
        return SimpleNamespace(logits=self.graphed(input_ids, position_ids), hidden_states=None)
