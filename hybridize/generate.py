"""Load a converted folder the way users will (trust_remote_code) and generate a short sample."""

from __future__ import annotations

from pathlib import Path

DEFAULT_PROMPT = "The capital of France is"


def sample_text(folder: str | Path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)
