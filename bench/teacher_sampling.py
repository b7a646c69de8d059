"""How fast can the teacher write training text? transformers' `generate` with its default growing cache against the
buffered cache the recipes use (hybridize/train/kv_buffer.py) and a static cache, without and with the forward
compiled (`generate` compiles it on its own for a static cache on a GPU), on a random model of the source's shape
(sampling speed does not depend on the weights; every sample runs to its full length, as `min_new_tokens` makes it).

    python bench/teacher_sampling.py --batch 1024 --new-tokens 256 --cases dynamic,buffered,static,static_compiled
    python bench/teacher_sampling.py --batch 512 --new-tokens 2047 --calls 1   (long documents: one call each)

Prints one line per case as it ends (generated tokens/s, the first call's time with any compilation in it, then a
second call's, which the rate is from; with `--calls 1` the rate is the first call's), so that a run stopped early
still says what it measured.
"""

from __future__ import annotations

import argparse
import time

import torch

from hybridize.train.kv_buffer import GENERATE_CACHE_KWARG, buffered_cache


def smollm2_shape():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                       rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def one_call(model, batch: int, new_tokens: int, case: str) -> float:
    ids = torch.full((batch, 1), 1, dtype=torch.long, device="cuda")
    extra = {
        "dynamic": {},
        # what the recipes use since 2026-12-02: buffers allocated once, filled in place
        "buffered": {GENERATE_CACHE_KWARG: buffered_cache(1 + new_tokens)},
        "static": {"cache_implementation": "static", "disable_compile": True},
        "static_compiled": {"cache_implementation": "static"},
    }[case]
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.9,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=2, **extra)
    torch.cuda.synchronize()
    assert out.shape == (batch, 1 + new_tokens), out.shape
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--cases", default="dynamic,buffered")
    ap.add_argument("--calls", type=int, choices=[1, 2], default=2, help="2: time the second call (warmed up)")
    args = ap.parse_args()
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_shape()).to("cuda", torch.bfloat16).eval()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}, {args.new_tokens} new "
          f"tokens", flush=True)
    for case in args.cases.split(","):
        first = one_call(model, args.batch, args.new_tokens, case)
        second = one_call(model, args.batch, args.new_tokens, case) if args.calls > 1 else first
        rate = args.batch * args.new_tokens / second
        print(f"{case:16s} first call {first:7.2f} s, second {second:7.2f} s: {rate:,.0f} generated tokens/s, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
