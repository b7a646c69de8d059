"""Real objects for the eval/bench/hub tests: a word-level tokenizer and a model that retrieves by copying.

The copy model is a transformers PreTrainedModel that predicts, at every position, the token that followed the
earlier position whose preceding tokens match the longest suffix of the context (an induction head taken to its
limit). It keeps its own cache (the tokens seen) so that it goes through the same chunked-prefill and
batch-copied-cache code paths as the hybrid and dense models.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

from hybridize.eval.retrieval import (
    FILLER, KV_QUESTION, MULTI_NEEDLE, MULTI_QUESTION, NAMES, NEEDLE_PREFIX, NEEDLE_SUFFIX, QUESTION,
)

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
SPECIALS = ["[UNK]", "<s>", "</s>", "<pad>"]


def word_tokenizer(extra_text: str = "") -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the retrieval texts (and `extra_text`); every digit is its own token, and so is each
    letter of the kv probes' strings (letters and digits alternate)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    templates = [MULTI_NEEDLE, MULTI_QUESTION, KV_QUESTION, '" ": " ". "?', " ".join(NAMES), " ".join("abcdef")]
    text = " ".join([FILLER, NEEDLE_PREFIX, NEEDLE_SUFFIX, QUESTION, *templates, extra_text])
    # runs of punctuation are one token for the Whitespace pre-tokenizer ('":' in the kv probes)
    words = sorted(set(re.findall(r"[A-Za-z]+|[^\w\s]+", text)) | set(re.findall(r"[^\w\s]", text)))
    vocab = {w: i for i, w in enumerate(SPECIALS + [str(d) for d in range(10)] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


class CopyConfig(PretrainedConfig):
    model_type = "eval-test-copy"

    def __init__(self, vocab_size: int = 64, **kwargs):
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class CopyCache:
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.ids.shape[1]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.ids = self.ids.repeat_interleave(repeats, dim=0)


def longest_match_next(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): for each position the token after the most recent earlier position with the longest match
    of the preceding tokens; the current token itself when nothing matches."""
    B, T = ids.shape
    out = ids.clone()
    prev = torch.zeros(B, T, dtype=torch.long)  # match length of (t-1, j) for j < t-1
    for t in range(T):
        cur = torch.zeros(B, T, dtype=torch.long)
        if t > 0:
            eq = (ids[:, :t] == ids[:, t : t + 1]).long()  # (B, t)
            shifted = torch.cat([torch.zeros(B, 1, dtype=torch.long), prev[:, : t - 1]], dim=1)
            cur[:, :t] = eq * (shifted + 1)
            best = cur[:, :t].flip(1).argmax(1)  # ties go to the most recent j
            j = t - 1 - best
            found = cur[torch.arange(B), j] > 0
            nxt = ids[torch.arange(B), j + 1]
            out[:, t] = torch.where(found, nxt, ids[:, t])
        prev = cur
    return out


class CopyModel(PreTrainedModel):
    config_class = CopyConfig
    base_model_prefix = "copy"

    def __init__(self, config: CopyConfig):
        super().__init__(config)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.post_init()

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0, attention_mask=None, **kwargs):
        past = cache.ids if cache is not None else input_ids[:, :0]
        full = torch.cat([past, input_ids], dim=1)
        pred = longest_match_next(full)[:, past.shape[1]:]
        logits = torch.full((*pred.shape, self.config.vocab_size), -30.0)
        logits.scatter_(-1, pred[..., None], 0.0)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: CopyCache(full) if use_cache else None})


def save_source_and_hybrid(root) -> None:
    """A tiny dense source (root/source) and a random 1:3 hybrid of the same vocabulary (root/hybrid), each saved with
    the word tokenizer, as the CLI tests load them."""
    from helpers import tiny_llama
    from hybridize.arch.configuration_hybridize import default_layer_types
    from hybridize.convert.build import build_hybrid
    from hybridize.export import save_hybrid

    tok = word_tokenizer()
    source = tiny_llama(vocab=len(tok))
    source.save_pretrained(root / "source")
    tok.save_pretrained(root / "source")
    save_hybrid(build_hybrid(tiny_llama(vocab=len(tok)), default_layer_types(4)), root / "hybrid", tokenizer=tok)

