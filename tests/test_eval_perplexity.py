"""Perplexity and chunked prefill against independent computations on tiny real models."""

import math

import torch

from eval_tools import word_tokenizer
from helpers import TINY_SPARSE, tiny_llama
from hybridize.arch.configuration_hybridize import default_layer_types
from hybridize.convert.build import build_hybrid
from hybridize.eval.perplexity import perplexity, perplexity_of_ids
from hybridize.eval.prefill import generate, prefill, use_chunked_sdpa


def _independent_ppl(model, ids, seq_len):
    """Plain full-window forwards and a hand-written mean NLL (no cache, no chunks)."""
    nll, count = 0.0, 0
    for w in range(ids.numel() // seq_len):
        window = ids[w * seq_len : (w + 1) * seq_len]
        with torch.no_grad():
            logits = model(window[None], use_cache=False).logits[0]
        logp = torch.log_softmax(logits[:-1].double(), -1)
        nll -= logp[torch.arange(seq_len - 1), window[1:]].sum().item()
        count += seq_len - 1
    return math.exp(nll / count), count


def test_perplexity_matches_independent_computation_dense_and_hybrid(seed):
    ids = torch.randint(3, 97, (5 * 40 + 7,))
    dense = tiny_llama()
    hybrid = build_hybrid(tiny_llama(), default_layer_types(4), sparse_dense_len=TINY_SPARSE["sparse_dense_len"])
    hybrid.config.update(TINY_SPARSE)  # sparse selection active beyond 24 tokens
    for model in (dense, hybrid):
        want, count = _independent_ppl(model, ids, 40)
        got = perplexity_of_ids(model, ids, 40, chunk_size=13)
        assert got.windows == 5 and got.tokens == count == 5 * 39
        assert abs(got.perplexity - want) / want < 1e-4, (type(model).__name__, got.perplexity, want)
        # and it is not a constant: a different text gives a different value
        other = perplexity_of_ids(model, torch.flip(ids, [0]), 40, chunk_size=13)
        assert other.perplexity != got.perplexity


def test_perplexity_of_a_text_file_uses_the_tokenizer(tmp_path):
    tok = word_tokenizer()
    text = "The grass is green. The sky is blue. A bird sings in the old tree by the road. " * 40
    path = tmp_path / "doc.txt"
    path.write_text(text)
    model = tiny_llama(vocab=len(tok))
    got = perplexity(model, tok, str(path), seq_len=32, max_windows=3)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    want, _ = _independent_ppl(model, ids[: 3 * 32], 32)
    assert got.windows == 3 and abs(got.perplexity - want) / want < 1e-4


def test_chunked_prefill_equals_one_forward(seed):
    ids = torch.randint(3, 97, (2, 61))
    dense = tiny_llama()
    full = dense(ids).logits[:, -1]
    use_chunked_sdpa(dense)  # lower-right causal SDPA for chunks after a cache
    got = prefill(dense, ids, chunk_size=16)
    torch.testing.assert_close(got.logits, full, rtol=1e-4, atol=1e-4)
    assert got.cache.get_seq_length() == 61
    hybrid = build_hybrid(tiny_llama(), default_layer_types(4))
    hybrid.config.update(TINY_SPARSE)
    full = hybrid(ids, use_cache=False).logits[:, -1]
    got = prefill(hybrid, ids, chunk_size=16)
    torch.testing.assert_close(got.logits, full, rtol=1e-4, atol=1e-4)


def test_generate_matches_step_by_step_greedy(seed):
    model = tiny_llama()
    ids = torch.randint(3, 97, (1, 30))
    new = generate(model, ids, 6, chunk_size=8)
    seq = ids
    for _ in range(6):  # greedy, recomputing the whole sequence each step
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(new, seq[:, 30:])
