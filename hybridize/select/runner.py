"""Run the teacher layer by layer, with any layer's attention swapped for another module.

The teacher is rebuilt as a hybrid whose every layer is softmax attention with RoPE and no output gate
(`reference_hybrid`): it computes what the source computes, and every Llama-family source gets one interface.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch.configuration_hybridize import SPARSE
from ..arch.modeling_hybridize import AttentionContext
from ..convert.build import build_hybrid

NEVER_SPARSE = 2**62  # dense attention at every length: the teacher, not InfLLM-V2


def has_qk_norm(model) -> bool:
    return any(k.endswith("self_attn.q_norm.weight") for k in model.state_dict())


def reference_hybrid(source_model):
    """The teacher as an all-attention hybrid (RoPE kept, no gates, dense at every length); shares its weights."""
    layers = source_model.config.num_hidden_layers
    return build_hybrid(source_model, [SPARSE] * layers, hype=False, output_gates=False,
                        qk_norm=has_qk_norm(source_model), sparse_dense_len=NEVER_SPARSE)


class LayerRunner:
    """Layer-by-layer forward passes of a reference hybrid (see `reference_hybrid`)."""

    def __init__(self, reference):
        self.model = reference.eval()
        self.layers = reference.model.layers
        self.num_layers = len(self.layers)
        for p in reference.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def context(self, input_ids: torch.Tensor) -> AttentionContext:
        B, T = input_ids.shape
        pos = torch.arange(T, device=self.device).view(1, -1).expand(B, -1)
        cos, sin = self.model.model.rotary_emb(pos)
        return AttentionContext(pos, cos, sin, None, None, None, None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids.to(self.device))

    def layer(self, i: int, hidden: torch.Tensor, ctx: AttentionContext, attention: nn.Module | None = None):
        layer = self.layers[i]
        mixer = attention if attention is not None else layer.self_attn
        hidden = hidden + mixer(layer.input_layernorm(hidden), ctx)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor, replace: dict[int, nn.Module] | None = None) -> list[torch.Tensor]:
        """The residual stream entering each layer, plus the last layer's output (L + 1 tensors): the teacher's, or
        with `replace[i]` as layer i's attention."""
        replace = replace or {}
        ctx = self.context(input_ids)
        hidden = self.embed(input_ids)
        states = [hidden]
        for i in range(self.num_layers):
            hidden = self.layer(i, hidden, ctx, replace.get(i))
            states.append(hidden)
        return states

    @torch.no_grad()
    def attention_io(self, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (attention input = input_layernorm output, attention output) of the teacher."""
        ctx = self.context(input_ids)
        hidden = self.embed(input_ids)
        out = []
        for layer in self.layers:
            x = layer.input_layernorm(hidden)
            a = layer.self_attn(x, ctx)
            out.append((x, a))
            hidden = hidden + a
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return out

    @torch.no_grad()
    def run_from(self, start: int, hidden: torch.Tensor, ctx: AttentionContext,
                 replace: dict[int, nn.Module] | None = None) -> torch.Tensor:
        """Layers start..L-1 from the residual stream `hidden`, with `replace[i]` as layer i's attention; final norm."""
        replace = replace or {}
        for i in range(start, self.num_layers):
            hidden = self.layer(i, hidden, ctx, replace.get(i))
        return self.model.model.norm(hidden)

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(normed_hidden).float()
