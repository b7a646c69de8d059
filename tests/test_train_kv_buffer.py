"""The teacher's sampling cache (hybridize/train/kv_buffer.py): the same tokens as transformers' own cache, written in
place into buffers allocated once."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from hybridize.train.kv_buffer import GENERATE_CACHE_KWARG, buffered_cache


def _teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _sample(model, ids, mask, new, cache, seed):
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.9, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=2, **{GENERATE_CACHE_KWARG: cache})


@pytest.mark.parametrize("prompts", ["unprompted", "left_padded"])
def test_same_tokens_and_keys_as_the_growing_cache(prompts):
    model = _teacher()
    if prompts == "unprompted":
        ids = torch.full((4, 1), 1)
        mask = torch.ones_like(ids)
    else:
        ids = torch.tensor([[2, 2, 1, 5, 6], [1, 7, 8, 9, 10], [2, 2, 2, 1, 11], [2, 1, 12, 13, 14]])
        mask = (torch.arange(5) >= torch.tensor([2, 0, 3, 1])[:, None]).long()
    new = 9
    plain, buffered = DynamicCache(), buffered_cache(ids.shape[1] + new)
    want = _sample(model, ids, mask, new, plain, seed=3)
    got = _sample(model, ids, mask, new, buffered, seed=3)
    assert torch.equal(got, want)
    assert not torch.equal(_sample(model, ids, mask, new, buffered_cache(ids.shape[1] + new), seed=4), want)
    for mine, theirs in zip(buffered.layers, plain.layers, strict=True):
        assert mine.filled == ids.shape[1] + new - 1  # the last token is sampled, never fed back
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert mine.keys.data_ptr() == mine._kbuf.data_ptr()  # a view of the buffer, not a copy
    assert len(buffered.layers) == model.config.num_hidden_layers


def test_a_step_past_the_capacity_is_refused():
    model = _teacher()
    ids = torch.full((2, 1), 1)
    with pytest.raises(ValueError, match="holds 4 positions; 5 were asked for"):
        _sample(model, ids, torch.ones_like(ids), 5, buffered_cache(4), seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_gpu_the_same_keys_as_the_growing_cache(dtype):
    """On CUDA attention reads views of the buffers where it read fresh tensors: the cached keys must still be equal,
    and in fp32 the sampled tokens too (bf16 attention may pick another kernel for a strided view)."""
    model = _teacher().to("cuda", dtype)
    ids = torch.full((64, 1), 1, device="cuda")
    mask = torch.ones_like(ids)
    plain, buffered = DynamicCache(), buffered_cache(1 + 48)
    want = _sample(model, ids, mask, 48, plain, seed=5)
    got = _sample(model, ids, mask, 48, buffered, seed=5)
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # the first step reads the same single key either way
        assert torch.equal(got[:, :2], want[:, :2])
    same = [torch.equal(m.keys[:, :, :2], t.keys[:, :, :2]) for m, t in zip(buffered.layers, plain.layers)]
    assert all(same), same
