"""Built-in probes that need no download.

General ability C: held-out language-model loss on calibration text (reported as an ability, -loss).
Retrieval ability R: synthetic tasks scored by exact match of teacher-forced answer tokens:
- passkey: a number hidden once in filler text (stated twice in its sentence), asked for at the end;
- key-value lookup (multi-query associative recall): a list of `word: number` pairs, then several queries, each a
  separate sample.
Samples are token sequences of a requested length built from a seeded random generator, so a seed fixes the probe set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
PASSKEY_INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will ask you for the pass key at the end.\n")
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
KV_INTRO = "Below is a list of keys and their values. Memorize them; I will ask for some of the values.\n"
KV_WORDS = (
    "apple river stone cloud tiger piano candle forest silver rocket garden window bridge castle dragon meadow "
    "orange pencil rabbit saddle temple violin wizard yellow anchor basket carpet desert engine falcon guitar harbor "
    "island jacket kettle ladder magnet needle oyster parrot quartz ribbon shadow tunnel umbrella valley walnut "
    "zebra bottle camera doctor feather helmet lemon mirror pepper rocket sponge ticket wallet"
).split()


@dataclass
class ProbeSample:
    """One sequence; the answer tokens sit at `answer_positions` (teacher-forced), predicted from the position before."""

    task: str
    length: int
    input_ids: torch.Tensor  # (T,)
    answer_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token ranges, one per answer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def passkey_sample(tokenizer, length: int, rng: random.Random, digits: int = 5) -> ProbeSample:
    """Pass key at a random depth of `length` tokens of filler (total length exactly `length`)."""
    key = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
    head = _prefix(tokenizer) + _ids(tokenizer, PASSKEY_INTRO)
    needle = _ids(tokenizer, f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = _ids(tokenizer, PASSKEY_QUESTION)
    answer = _ids(tokenizer, f" {key}.")
    fill_len = length - len(head) - len(needle) - len(question) - len(answer)
    if fill_len < 8:
        raise ValueError(f"passkey length {length} is too short for the prompt: use at least "
                         f"{length - fill_len + 8} tokens")
    filler = _ids(tokenizer, FILLER * (fill_len // 4 + 2))[:fill_len]
    cut = rng.randint(0, fill_len)
    ids = head + filler[:cut] + needle + filler[cut:] + question + answer
    start = len(ids) - len(answer)
    return ProbeSample("passkey", length, torch.tensor(ids), [(start, start + len(answer))])


def kv_sample(tokenizer, length: int, rng: random.Random, queries: int = 4) -> ProbeSample:
    """Key-value list filling `length` tokens, then `queries` lookups of distinct keys (each one answer span)."""
    head = _prefix(tokenizer) + _ids(tokenizer, KV_INTRO)
    pairs: list[tuple[str, str]] = []
    body: list[int] = []
    words = list(KV_WORDS)
    rng.shuffle(words)
    tail_budget = queries * 14 + 4
    for n, word in enumerate(words * 50):
        name = word if n < len(words) else f"{word}{n // len(words)}"
        value = str(rng.randint(100, 999))
        line = _ids(tokenizer, f"{name}: {value}\n")
        if len(head) + len(body) + len(line) + tail_budget > length:
            break
        pairs.append((name, value))
        body += line
    if len(pairs) < queries:
        raise ValueError(f"key-value length {length} is too short for {queries} queries: use a longer length")
    asked = rng.sample(pairs, queries)
    ids = head + body + _ids(tokenizer, "\nQuestions:")
    spans = []
    for name, value in asked:
        ids += _ids(tokenizer, f"\nThe value of {name} is")
        answer = _ids(tokenizer, f" {value}.")
        spans.append((len(ids), len(ids) + len(answer)))
        ids += answer
    # Pad after the intro with newline tokens so every sample has exactly `length` tokens.
    pad = _ids(tokenizer, "\n")[-1:] * max(0, length - len(ids))
    ids = ids[: len(head)] + pad + ids[len(head):]
    spans = [(a + len(pad), b + len(pad)) for a, b in spans]
    return ProbeSample("kv", length, torch.tensor(ids), spans)


@dataclass
class ProbeSettings:
    passkey_lengths: tuple[int, ...] = (256, 512)
    kv_lengths: tuple[int, ...] = (256, 512)
    samples_per_length: int = 2
    kv_queries: int = 4

    def validate(self, max_length: int | None = None) -> None:
        for name in ("passkey_lengths", "kv_lengths"):
            for n in getattr(self, name):
                if n < 64:
                    raise ValueError(f"{name}: {n} is too short, use at least 64 tokens")
                if max_length is not None and n > max_length:
                    raise ValueError(f"{name}: {n} exceeds the model's context of {max_length} tokens")
        if self.samples_per_length < 1 or self.kv_queries < 1:
            raise ValueError("samples_per_length and kv_queries must be at least 1")


def build_probes(tokenizer, settings: ProbeSettings, seed: int = 0) -> list[ProbeSample]:
    rng = random.Random(seed)
    samples = []
    for n in settings.passkey_lengths:
        samples += [passkey_sample(tokenizer, n, rng) for _ in range(settings.samples_per_length)]
    for n in settings.kv_lengths:
        samples += [kv_sample(tokenizer, n, rng, settings.kv_queries) for _ in range(settings.samples_per_length)]
    return samples


def answer_matches(answer_logits: torch.Tensor, sample: ProbeSample) -> list[bool]:
    """Exact match per answer span. `answer_logits` holds the logits at `answer_positions(sample)`, in that order."""
    out, row = [], 0
    for a, b in sample.answer_spans:
        pred = answer_logits[row : row + (b - a)].argmax(-1).cpu()
        out.append(bool(torch.equal(pred, sample.input_ids[a:b].cpu())))
        row += b - a
    return out


def answer_logprob(answer_logits: torch.Tensor, sample: ProbeSample) -> float:
    """Summed log-probability of the answer tokens, from the logits at `answer_positions(sample)`."""
    target = torch.cat([sample.input_ids[a:b] for a, b in sample.answer_spans]).to(answer_logits.device)
    lp = torch.log_softmax(answer_logits.float(), -1)
    return lp.gather(-1, target[:, None]).sum().item()


def answer_positions(sample: ProbeSample) -> torch.Tensor:
    """Positions whose logits predict answer tokens (all spans, in order)."""
    return torch.cat([torch.arange(a - 1, b - 1) for a, b in sample.answer_spans])


def retrieval_scores(results: dict[str, list[bool]]) -> dict[str, float]:
    """Accuracy per group (task@length) and the overall R: the mean of the group accuracies."""
    scores = {k: sum(v) / len(v) for k, v in results.items() if v}
    scores["R"] = sum(scores.values()) / len(scores) if scores else 0.0
    return scores
