"""Meta's original format (params.json + consolidated.*.pth): a tiny Llama written in Meta's real layout converts.

The test writes Meta's layout itself: q/k rows in Meta's pairwise (complex) RoPE order, and several model-parallel
shards split the way Meta's checkpoints are (column-parallel weights on dim 0, row-parallel on dim 1, the embedding on
dim 1 for Llama 2 and dim 0 for Llama 3). A check below first proves that this layout is Meta's, by running Meta's
complex-number RoPE on it and comparing with transformers' rotation of the original weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from hybridize.cli import main

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def tiny_llama(rope: dict | None = None, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                         rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(8.0)
    return model


def to_meta_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' half-split rows of each head -> Meta's pairs: row 2i <- row i, row 2i+1 <- row i + d/2."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(heads * d, -1)


def meta_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    c = model.config
    sd = model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            f"layers.{i}.attention.wq.weight": to_meta_rows(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": to_meta_rows(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    return out


def shard_split(name: str, tensor: torch.Tensor, shards: int, vocab_parallel: bool) -> list[torch.Tensor]:
    if tensor.dim() == 1:
        return [tensor.clone() for _ in range(shards)]  # norms are replicated
    if name == "tok_embeddings.weight":
        dim = 0 if vocab_parallel else 1
    elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        dim = 1
    else:
        dim = 0
    return [t.clone() for t in tensor.chunk(shards, dim=dim)]


def write_meta(model: LlamaForCausalLM, folder: Path, shards: int, llama3: bool = False) -> None:
    folder.mkdir(parents=True)
    c = model.config
    state = meta_state(model)
    for s in range(shards):
        torch.save({n: shard_split(n, t, shards, llama3)[s] for n, t in state.items()} | {"rope.freqs": torch.ones(8)},
                   folder / f"consolidated.{s:02d}.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": -1 if not llama3 else c.vocab_size,
              "multiple_of": 32, "norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_parameters["rope_theta"]}
    if llama3:
        params["use_scaled_rope"] = True
    (folder / "params.json").write_text(json.dumps(params))


def meta_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's apply_rotary_emb: adjacent features (2i, 2i+1) rotate as one complex number. x: (T, H, D)."""
    T, _, D = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    angles = torch.outer(torch.arange(T).float(), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]
    pairs = torch.view_as_complex(x.float().reshape(T, -1, D // 2, 2))
    return torch.view_as_real(pairs * rotation).reshape(T, -1, D)


def test_written_layout_is_metas(seed):
    """Sanity of the test's own writer: Meta's RoPE on the Meta-layout q gives transformers' rotated q, reordered."""
    model = tiny_llama()
    c = model.config
    H, D = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    x = torch.randn(7, c.hidden_size)
    wq = model.model.layers[0].self_attn.q_proj.weight.detach()
    q_meta = meta_rope((x @ to_meta_rows(wq, H).T).reshape(7, H, D), 10000.0)
    q_hf = (x @ wq.T).reshape(1, 7, H, D).transpose(1, 2)
    cos, sin = model.model.rotary_emb(q_hf, torch.arange(7)[None])
    q_hf, _ = apply_rotary_pos_emb(q_hf, q_hf, cos, sin)
    q_hf = q_hf[0].transpose(0, 1)  # (T, H, D)
    torch.testing.assert_close(q_meta[..., 0::2], q_hf[..., : D // 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_meta[..., 1::2], q_hf[..., D // 2 :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shards, llama3, tie",
    [(1, False, False), (2, False, False), (2, True, False), (4, True, True)],
    ids=["llama2-1shard", "llama2-2shards", "llama3.1-2shards", "llama3.2-tied-4shards"],
)
def test_meta_checkpoint_reproduces_logits(tmp_path, shards, llama3, tie):
    model = tiny_llama(LLAMA3_ROPE if llama3 else None, tie=tie)
    write_meta(model, tmp_path / "meta", shards, llama3)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "meta"), "--output", str(out), "--ratio", "1:0",
                                       "--no-hype", "--no-gates", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    hybrid = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert hybrid.config.rope_parameters["rope_type"] == ("llama3" if llama3 else "default")
    ids = torch.randint(0, 96, (2, 21))
    with torch.no_grad():
        diff = (hybrid(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_meta_checkpoint_one_in_four_generates(tmp_path):
    model = tiny_llama()
    write_meta(model, tmp_path / "meta", 2)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "meta" / "params.json"), "--output", str(out),
                                       "--ratio", "1:3", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    hybrid = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hybrid.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False).shape == (1, 8)
