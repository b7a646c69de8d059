"""Load a converted folder and generate a short sample. The folder loads with the installed hybridize classes, not
its own copy of the modeling files: that copy is code, and the folder may have been replaced since it was written."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PROMPT = "The capital of France is"


def sample_text(folder: str | Path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .arch import register_auto_classes

    register_auto_classes()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    return generate_text(model, tokenizer, prompt, max_new_tokens)


def generate_text(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` by an in-memory model (the same decoding sample_text uses)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)
