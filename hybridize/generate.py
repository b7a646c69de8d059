"""Load a converted folder the way users will (trust_remote_code) and generate a short sample."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PROMPT = "The capital of France is"


def sample_text(folder: str | Path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return generate_text(model, tokenizer, prompt, max_new_tokens)


def generate_text(model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` by an in-memory model (the same decoding sample_text uses)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)
