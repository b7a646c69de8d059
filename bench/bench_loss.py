"""The training losses on a GPU: the Triton kernel (kernels/loss_triton.py) against the chunked PyTorch form it
replaces (hybridize.train.losses.chunked_row_losses), loss and gradient together, as one distillation micro-batch
of the retention recipe hands them over (16 x 2048 tokens, SmolLM2's 49,152-token vocabulary, bf16 logits).

    python bench/bench_loss.py [--rows 32768] [--vocab 49152] [--modes forward ce] [--out results.json]

Prints one row per mode: milliseconds of each (median of --repeat timed calls after two untimed ones), their ratio,
the kernel's memory floor (it reads the student's and the teacher's logits twice and writes the gradient once, in
bf16) and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench_lightning import copy_bandwidth  # bench/ is the script's folder, so on its path
from bench_sparse import timed
from hybridize.kernels.loss_triton import row_losses_triton
from hybridize.train.losses import chunked_row_losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16 * 2048)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--modes", nargs="+", default=["forward", "reverse", "ce"])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_loss.py needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    R, V = args.rows, args.vocab
    s = (torch.randn(R, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    t = (torch.randn(R, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    y = torch.randint(0, V, (R,), device="cuda", generator=g)
    keep = torch.rand(R, device="cuda", generator=g) > 0.01
    bw = copy_bandwidth()
    rows = []
    for mode in args.modes:
        other = y if mode == "ce" else t
        reads = (1 if mode == "ce" else 2) * 2 * R * V * 2  # both passes read the logits they need
        floor_ms = (reads + R * V * 2) / bw * 1e3
        torch.cuda.reset_peak_memory_stats()
        kernel_ms = timed(lambda: row_losses_triton(s, other, keep, mode, 1.0, True), args.repeat, warmup=2)
        kernel_gib = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        torch_ms = timed(lambda: chunked_row_losses(s, other, keep, mode, 1.0, True), args.repeat, warmup=2)
        torch_gib = torch.cuda.max_memory_allocated() / 2**30
        loss, grad = row_losses_triton(s, other, keep, mode, 1.0, True)
        total, ref = chunked_row_losses(s, other, keep, mode, 1.0, True)
        rows.append(dict(mode=mode, rows=R, vocab=V, kernel_ms=kernel_ms, pytorch_ms=torch_ms,
                         speedup=torch_ms / kernel_ms, floor_ms=floor_ms, kernel_over_floor=kernel_ms / floor_ms,
                         kernel_peak_gib=kernel_gib, pytorch_peak_gib=torch_gib,
                         loss_rel_diff=abs(float(loss.sum()) - float(total)) / abs(float(total)),
                         grad_max_diff=float((grad.float() - ref.float()).abs().max())))
        del loss, grad, total, ref
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_tb_s=bw / 1e12,
                rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    print(f"| mode | rows x vocab | PyTorch (chunked) ms | kernel ms | speed-up | floor ms | kernel / floor | "
          f"loss rel. diff | grad max diff |  ({info['device']}, copy {bw / 1e12:.2f} TB/s)")
    for r in rows:
        print(f"| {r['mode']} | {R} x {V} | {r['pytorch_ms']:.2f} | {r['kernel_ms']:.2f} | {r['speedup']:.1f}x | "
              f"{r['floor_ms']:.2f} | {r['kernel_over_floor']:.2f}x | {r['loss_rel_diff']:.1e} | "
              f"{r['grad_max_diff']:.1e} |")


if __name__ == "__main__":
    main()
