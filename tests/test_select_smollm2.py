"""The retrieval probes are sane on the unmodified default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import random

import pytest
import torch

from hybridize.select.probes import answer_matches, answer_positions, kv_sample, passkey_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from hybridize.convert.default_model import load_default_model

    return load_default_model()


@torch.no_grad()
def accuracy(model, samples) -> float:
    hits = []
    for s in samples:
        hidden = model.model(s.input_ids.view(1, -1)).last_hidden_state[0]
        hits += answer_matches(model.lm_head(hidden[answer_positions(s)]), s)
    return sum(hits) / len(hits)


def test_passkey_at_1k_tokens(smollm2):
    model, tokenizer = smollm2
    rng = random.Random(1234)
    samples = [passkey_sample(tokenizer, 1024, rng) for _ in range(10)]
    assert all(len(s.input_ids) == 1024 for s in samples)
    # the answer span is the key itself, as the tokenizer writes it
    for s in samples:
        (a, b), = s.answer_spans
        text = tokenizer.decode(s.input_ids[a:b])
        assert text.strip().rstrip(".").isdigit() and text.strip().rstrip(".") in tokenizer.decode(s.input_ids[:a])
    assert accuracy(model, samples) >= 0.9


def test_key_value_probe_is_not_trivial(smollm2):
    """Key-value lookup at 256 tokens: the model gets some answers, and a wrong list gets none right."""
    model, tokenizer = smollm2
    rng = random.Random(99)
    samples = [kv_sample(tokenizer, 256, rng, queries=4) for _ in range(2)]
    assert accuracy(model, samples) > 0.0
    # the same questions with the list's values scrambled: exact match cannot come from the questions alone
    scrambled = []
    for s in samples:
        ids = s.input_ids.clone()
        first_answer = s.answer_spans[0][0]
        body = ids[: first_answer - 30]
        digits = [i for i in range(len(body)) if tokenizer.decode(body[i : i + 1]).strip().isdigit()]
        perm = torch.tensor(digits)[torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))]
        ids[torch.tensor(digits)] = ids[perm]
        scrambled.append(type(s)(s.task, s.length, ids, s.answer_spans))
    assert accuracy(model, scrambled) < accuracy(model, samples)
