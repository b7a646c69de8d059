"""Long-context retrieval: needles hidden in filler text at several context lengths and depths.

Each probe is built at the token level (so its length is exact): filler, the needles at their depths, more filler, then
a question that ends where the asked needle's answer starts. Three tasks:

- passkey: one needle "The pass key is <digits>. Remember it.", question "What is the pass key? The pass key is";
- multikey: several "The pass key of <name> is <digits>." with distinct names; the question asks one name's key;
- kv: several '"<key>": "<value>".' pairs of random hex-like strings; the question asks the value of one key.

Two scores:

- accuracy: greedy decoding reproduces the answer exactly (chance is about 10^-digits);
- choice_accuracy: the true answer has the highest log-likelihood per token among `choices` answers of the same form
  (chance is 1/choices; the other needles' answers are among them), which separates a model that knows nothing from
  one that retrieves a little.

The prompt is prefilled in chunks once; the candidate keys are then scored as one batch that continues from copies of
that cache, so a probe costs one long prefill whatever the number of choices.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..common import format_length
from .prefill import DEFAULT_CHUNK, forward_chunk, prefill

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "The river runs to the sea and the wind moves over the hills. A bird sings in the old tree by the road. "
)
NEEDLE_PREFIX = "The pass key is"
NEEDLE_SUFFIX = ". Remember it. "
QUESTION = " What is the pass key? "
# multikey: several named pass keys, the question asks one; kv: "key": "value" pairs of random strings
MULTI_NEEDLE = "The pass key of {name} is"
MULTI_QUESTION = " What is the pass key of {name}? "
KV_QUESTION = ' What is the value of "{key}"? '
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James", "Karen", "Louis",
         "Maria", "Nathan", "Olivia", "Peter")
TASKS = ("passkey", "multikey", "kv")


@dataclass
class ProbeResult:
    length: int
    depth: float
    key: str
    correct: bool  # greedy decoding gives the key
    chosen: bool  # the key is the most likely of the choices
    key_logprob: float
    # the answer token at which greedy decoding first departs from the answer; -1: it writes all of it. A miss at 0
    # is one that never started the answer (a pass key's leading space token lost to " a").
    first_miss: int = -1


@dataclass
class RetrievalResult:
    lengths: list[int]
    depths: list[float]
    digits: int
    choices: int
    accuracy: float
    choice_accuracy: float
    chance: float  # choice accuracy of a model that knows nothing
    grid: list[list[float]]  # accuracy per [length][depth]
    choice_grid: list[list[float]]
    first_token_misses: list[int]  # per length: probes whose greedy answer never began (first_miss 0)
    probes: list[ProbeResult] = field(default_factory=list)
    task: str = "passkey"
    trials: int = 1  # probes per [length][depth] cell

    def to_dict(self) -> dict:
        return asdict(self)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def random_keys(rng: random.Random, digits: int, count: int) -> list[str]:
    """`count` distinct keys in the order drawn: the seed alone fixes them (a set's order of strings changes with
    each process's hash seed, and with it which key a probe asked for)."""
    if count > 9 * 10 ** (digits - 1):
        raise ValueError(f"cannot draw {count} distinct {digits}-digit keys")
    keys: list[str] = []
    while len(keys) < count:
        key = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if key not in keys:
            keys.append(key)
    return keys


def build_haystack(tokenizer, length: int, needles, depths, question, filler: str = FILLER) -> list[int]:
    """Token ids of a prompt of exactly `length` tokens: BOS, repeated filler with each needle inserted at its depth
    (a fraction of the filler), then the question. Needles and the question are sequences of text pieces tokenized
    one by one, so an answer tokenized on its own has the same tokens inside its needle."""
    if len(needles) != len(depths):
        raise ValueError(f"{len(needles)} needles but {len(depths)} depths")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depth must be in [0, 1], got {bad[0]}")
    needle_ids = [_pieces(tokenizer, n) for n in needles]
    question_ids = _pieces(tokenizer, question)
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    budget = length - len(bos) - sum(map(len, needle_ids)) - len(question_ids)
    if budget < 0:
        raise ValueError(f"length {length} is too short for a probe (needs at least {length - budget} tokens)")
    filler_ids = _ids(tokenizer, filler)
    repeated = (filler_ids * (budget // len(filler_ids) + 1))[:budget]
    prompt, at = list(bos), 0
    for depth, ids in sorted(zip(depths, needle_ids), key=lambda x: x[0]):
        cut = int(round(depth * budget))
        prompt += repeated[at:cut] + ids
        at = cut
    prompt += repeated[at:] + question_ids
    assert len(prompt) == length
    return prompt


def _pieces(tokenizer, pieces) -> list[int]:
    return [i for p in pieces for i in _ids(tokenizer, p)]


def build_probe(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """Token ids of one pass-key prompt of exactly `length` tokens, and the key's tokens that should follow it."""
    needle = [NEEDLE_PREFIX, " " + key, NEEDLE_SUFFIX]
    prompt = build_haystack(tokenizer, length, [needle], [depth], [QUESTION, NEEDLE_PREFIX])  # ends as the needle
    return prompt, _ids(tokenizer, " " + key)


@dataclass
class Probe:
    prompt: list[int]
    candidates: list[list[int]]  # continuations to score, the right answer first
    answer: str


def random_hex(rng: random.Random, chars: int = 8) -> str:
    """A hex-like string of alternating letters a-f and digits ("c4a9e0b7"): random for a subword tokenizer, and a
    word-level test tokenizer splits it into single characters."""
    return "".join(rng.choice("abcdef") if i % 2 == 0 else rng.choice("0123456789") for i in range(chars))


def _distinct(draw, count: int, limit: int = 10000) -> list[str]:
    out: list[str] = []
    for _ in range(limit):
        x = draw()
        if x not in out:
            out.append(x)
            if len(out) == count:
                return out
    raise ValueError(f"cannot draw {count} distinct values")


def make_probe(task: str, tokenizer, length: int, depth: float, rng: random.Random, *, choices: int = 10,
               digits: int = 5, needles: int = 4, hex_chars: int = 8) -> Probe:
    """One probe of `task` ("passkey", "multikey" or "kv"), the asked needle at `depth`, the others (multikey, kv) at
    random depths. The candidates are the answer, then the other needles' answers (a model that retrieves the wrong
    needle picks one of them), then random ones: `choices` in all."""
    if task == "passkey":
        keys = random_keys(rng, digits, choices)
        prompt, _ = build_probe(tokenizer, length, depth, keys[0])
        return Probe(prompt, [_ids(tokenizer, " " + k) for k in keys], keys[0])
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}: choose from {', '.join(TASKS)}")
    if needles < 1 or needles > len(NAMES):
        raise ValueError(f"needles must be in [1, {len(NAMES)}], got {needles}")
    depths = [depth] + [rng.random() for _ in range(needles - 1)]
    if task == "multikey":
        names = rng.sample(NAMES, needles)
        keys = random_keys(rng, digits, max(choices, needles))
        items = [[MULTI_NEEDLE.format(name=n), " " + k, NEEDLE_SUFFIX] for n, k in zip(names, keys)]
        question = [MULTI_QUESTION.format(name=names[0]), MULTI_NEEDLE.format(name=names[0])]
        answers = [" " + k for k in keys]
    else:
        strings = _distinct(lambda: random_hex(rng, hex_chars), needles + max(choices, needles))
        kv_keys, values = strings[:needles], strings[needles:]
        items = [[' "', k, '": "', v, '".'] for k, v in zip(kv_keys, values)]
        question = [KV_QUESTION.format(key=kv_keys[0]), ' "', kv_keys[0], '": "']
        answers = values
    prompt = build_haystack(tokenizer, length, items, depths, question)
    return Probe(prompt, [_ids(tokenizer, a) for a in answers[:choices]], answers[0].strip())


@torch.no_grad()
def score_candidates(model, prompt: list[int], candidates: list[list[int]], chunk_size: int = DEFAULT_CHUNK):
    """Log-likelihood of each candidate continuation of `prompt`, whether greedy decoding follows each one, and the
    first of its tokens where it does not. Returns (logprobs (K,), greedy (K,) bool, first_miss (K,) long, -1 where
    greedy follows the whole candidate)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    state = prefill(model, ids, chunk_size)
    first = torch.log_softmax(state.logits[0].float(), -1)  # (V,)
    K = len(candidates)
    lengths = torch.tensor([len(c) for c in candidates], device=device)
    n = int(lengths.max())
    cand = torch.tensor([c + [c[-1]] * (n - len(c)) for c in candidates], dtype=torch.long, device=device)  # (K, n)
    logp = first[cand[:, 0]]
    hits = cand[:, :1] == first.argmax()  # (K, 1), then (K, n): does greedy write token j of each candidate
    if n > 1:
        cache = state.cache
        cache.batch_repeat_interleave(K)
        logits, _ = forward_chunk(model, cand[:, :-1], cache, logits_to_keep=0)  # (K, n-1, V): predicts cand[:, 1:]
        lp = torch.log_softmax(logits.float(), -1)
        target = cand[:, 1:]
        tok_lp = lp.gather(-1, target[..., None])[..., 0]
        valid = torch.arange(1, n, device=device)[None, :] < lengths[:, None]
        logp = logp + (tok_lp * valid).sum(-1)
        hits = torch.cat([hits, (lp.argmax(-1) == target) | ~valid], dim=1)
    missed = ~hits
    first_miss = torch.where(missed.any(-1), missed.float().argmax(-1), torch.full_like(lengths, -1))
    return logp.cpu(), hits.all(-1).cpu(), first_miss.cpu()


def run_retrieval(
    model,
    tokenizer,
    task: str = "passkey",
    lengths=(256, 512, 1024),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    trials: int = 1,
    digits: int = 5,
    choices: int = 10,
    needles: int = 4,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool = False,
) -> RetrievalResult:
    """Run the probes of `task` (see make_probe) over `lengths` x `depths`, `trials` probes per cell."""
    if tokenizer is None:
        raise ValueError("retrieval needs a tokenizer: the model folder has none")
    if choices < 2:
        raise ValueError(f"choices must be at least 2, got {choices}")
    rng = random.Random(seed)
    lengths, depths = [int(x) for x in lengths], [float(d) for d in depths]
    cells = [(li, di, t) for li in range(len(lengths)) for di in range(len(depths)) for t in range(trials)]
    if progress:
        from tqdm.auto import tqdm

        cells = tqdm(cells, desc=f"retrieval ({task})", leave=False)
    probes: list[ProbeResult] = []
    hits = [[0.0] * len(depths) for _ in lengths]
    chosen = [[0.0] * len(depths) for _ in lengths]
    for li, di, _ in cells:
        probe = make_probe(task, tokenizer, lengths[li], depths[di], rng, choices=choices, digits=digits,
                           needles=needles)
        logp, greedy, first_miss = score_candidates(model, probe.prompt, probe.candidates, chunk_size)
        # per token: kv answers of one form tokenize to different lengths, and a sum favours the shorter ones
        per_token = logp / torch.tensor([len(c) for c in probe.candidates], dtype=logp.dtype)
        is_chosen = bool(per_token[0] > per_token[1:].max())
        probes.append(ProbeResult(lengths[li], depths[di], probe.answer, bool(greedy[0]), is_chosen, float(logp[0]),
                                  int(first_miss[0])))
        hits[li][di] += float(greedy[0]) / trials
        chosen[li][di] += float(is_chosen) / trials
    n = len(probes)
    first_token = [sum(p.length == L and p.first_miss == 0 for p in probes) for L in lengths]
    return RetrievalResult(
        lengths, depths, digits, choices,
        accuracy=sum(p.correct for p in probes) / n,
        choice_accuracy=sum(p.chosen for p in probes) / n,
        chance=1.0 / choices,
        grid=hits, choice_grid=chosen, first_token_misses=first_token, probes=probes, task=task, trials=trials,
    )


def passkey_retrieval(model, tokenizer, lengths=(256, 512, 1024), depths=(0.0, 0.25, 0.5, 0.75, 1.0), **kwargs):
    """Run the pass-key probes over `lengths` x `depths` (`trials` keys each); see run_retrieval."""
    return run_retrieval(model, tokenizer, "passkey", lengths, depths, **kwargs)


def plot_heatmap(results: dict[str, RetrievalResult | dict], path: str | Path, metric: str = "grid") -> Path:
    """One heat map per model (accuracy over length x depth), side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(name, r.to_dict() if hasattr(r, "to_dict") else r) for name, r in results.items()]
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], items):
        grid = torch.tensor(r[metric]).T  # depths x lengths
        im = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(r["lengths"])), [format_length(n) for n in r["lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:.0%}" for d in r["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: pass key {'accuracy' if metric == 'grid' else 'choice accuracy'}")
        for (i, j), v in zip(
            [(i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])], grid.flatten().tolist()
        ):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = [
    "TASKS", "Probe", "ProbeResult", "RetrievalResult", "build_haystack", "build_probe", "make_probe",
    "passkey_retrieval", "plot_heatmap", "run_retrieval", "score_candidates",
]
