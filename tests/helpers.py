"""Tiny real transformers models shared by the tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_SPARSE = dict(  # block structure small enough that short sequences cross many blocks
    sparse_dense_len=24,
    sparse_block_size=16,
    sparse_compress_kernel=8,
    sparse_compress_stride=4,
    sparse_topk=4,
    sparse_init_blocks=1,
    sparse_local_blocks=2,
    sparse_selection="token",  # exact per-token selection: cached decoding reproduces the full forward
)
GPU_SPARSE = dict(  # the kernels' block geometry (64-token blocks, compressed keys 32/16), a short dense_len
    sparse_dense_len=128,
    sparse_topk=4,
    sparse_init_blocks=1,
    sparse_local_blocks=2,
    sparse_selection="token",
    prefill_chunk_size=192,
)


def cache_of(out):
    """The cache of a model output (transformers renamed the field during 5.x)."""
    return out.past_key_values if "past_key_values" in out else out.cache


def left_padded(prompts, pad_id: int = 0):
    """Token lists left-padded with `pad_id` to the longest: (ids, attention mask)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, L - len(p):] = 1
    return ids, mask


def left_padded_prompts(lengths, seed: int, vocab: int = 97):
    """Random prompts of the given lengths, left-padded with 0 to the longest: (ids, attention mask)."""
    g = torch.Generator().manual_seed(seed)
    return left_padded([torch.randint(3, vocab, (n,), generator=g) for n in lengths])


def tiny_llama(num_kv_heads: int = 2, layers: int = 4, tie: bool = False, vocab: int = 97, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform logits; scale up so greedy choices are not decided by rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def gpu_llama():
    """A small random Llama for the GPU tests of the whole model: head dim 64 (the kernels' tiles), a lm_head scaled
    up so that greedy choices are clear-cut."""
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=256, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})).eval()
    with torch.no_grad():
        src.lm_head.weight.mul_(8.0)
    return src


def require_triton_interpreter() -> None:
    """Skip unless triton's CPU interpreter can run the kernels: triton 3.6's interpreter gives a reduction such as
    tl.max a shape-(1,) result that `range` cannot take as a bound (checked against 3.6.0, 3.7.0, 3.8.0 and 3.9.0;
    3.7 and later run every kernel)."""
    import pytest

    try:
        import triton
    except ImportError:
        pytest.skip("the kernel tests on the CPU need triton (pip install 'triton>=3.7')")
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 7):
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run the kernels: pip install 'triton>=3.7'")


INTERPRETED_PACKAGE = "_kernels_interpreted"


def load_interpreted(path):
    """A kernel file (a Path in kernels/) with its kernels built for the Triton interpreter (CPU tensors). The kernel
    files import each other relatively, so the whole kernels/ folder is loaded as a private package (every module of
    it imported while the flag is set) and the file's module taken from it. TRITON_INTERPRET is set only while it
    loads (triton reads it when a kernel is decorated), so the rest of the suite keeps the compiled kernels."""
    import importlib
    import importlib.machinery
    import importlib.util
    import os
    import sys

    require_triton_interpreter()
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if INTERPRETED_PACKAGE not in sys.modules:
            # kernels/ has no __init__.py (tests/test_layout.py): an empty package over the folder
            spec = importlib.machinery.ModuleSpec(INTERPRETED_PACKAGE, None, is_package=True)
            spec.submodule_search_locations = [str(path.parent)]
            package = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = package  # dataclasses look their module up there
        module = importlib.import_module(f"{INTERPRETED_PACKAGE}.{path.stem}")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert module.HAS_TRITON
    return module
