"""The before/after sample `hybridize convert` prints: the source and the converted model continue the same prompt."""

from __future__ import annotations

from dataclasses import dataclass

from ..generate import DEFAULT_PROMPT, generate_text, sample_text
from .checkpoint import Checkpoint
from .converter import ConvertResult, runs_unasked
from .source import load_source_model


@dataclass
class Samples:
    prompt: str
    source: str
    hybrid: str


def should_sample(result: ConvertResult, requested: bool | None) -> bool:
    """--sample / --no-sample, or (unset) sample a source that runs unasked (converter.runs_unasked)."""
    return wants_sample(result.checkpoint, requested)


def wants_sample(ckpt: Checkpoint | None, requested: bool | None) -> bool:
    """should_sample before the conversion: convert keeps the source in memory for the sample only when this holds."""
    if requested is not None:
        return requested
    return runs_unasked(ckpt)


def before_after(result: ConvertResult, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 16) -> Samples | None:
    """Greedy samples of the source and of the converted folder (loaded with the installed hybridize classes);
    None when the output has no tokenizer. The two models are loaded one after the other, never together."""
    from transformers import AutoTokenizer

    from ..arch import register_auto_classes

    folder = result.output
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None
    register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    source_model = result.source_model if result.source_model is not None else load_source_model(result.checkpoint)
    result.source_model = None  # the two models are never held together
    before = generate_text(source_model, tokenizer, prompt, max_new_tokens)
    del source_model
    after = sample_text(folder, prompt, max_new_tokens)
    return Samples(prompt, before, after)
