"""What the compiler makes of the Lightning forward kernels for an H100 (sm_90), on a machine without a GPU.

    PYTHONPATH=$PWD python bench/lightning_compile_report.py [--configs sweep|shipped] [--T 65536]

Each forward config of bench_lightning.py (the shipped ones, or the whole SWEEP) is launched on CPU tensors of the
benchmark's shape (bf16, B = 1, 32 heads, d = 128) with every launch turned into a compile for sm_90 (Triton's own
ptxas). Per kernel it prints: registers per thread and stack bytes (from the cubin; stack > 0 means spills), shared
memory per program, how many programs fit on one SM by registers and by shared memory, and, for the longest loop of
the kernel (the walk), its instructions per chunk: all, barriers, tensor-core instructions (HGMMA) and waits on them.
No timing: it says what fits and how long the serial chain per chunk is, not how fast it runs. The numbers depend on
the Triton version installed here (the GPU machine has its own).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parent))

REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024  # H100: 228 KB per SM, 1 KB of it reserved per resident program
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _Sm90Driver:
    """Enough of a Triton driver to compile for an H100: no device is touched."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_only(calls: list):
    """Make every kernel launch compile (and record the kernel) instead of running."""
    run = JITFunction.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        calls.append((self.fn.__name__, kernel))
        return kernel

    driver.set_active(_Sm90Driver())
    JITFunction.run = compile_run


def _tool(name: str, *args: str) -> str:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, check=True).stdout


def _longest_loop(sass: str) -> list[str]:
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    if not loops:
        return []
    a, b = max(loops, key=lambda x: x[1] - x[0])
    return lines[a : b + 1]


def describe(name: str, kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = _tool("cuobjdump", "--dump-resource-usage", path)
        sass = _tool("nvdisasm", "-c", path)
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    warps = kernel.metadata.num_warps
    shared = kernel.metadata.shared
    regs_per_warp = -(-regs * 32 // 256) * 256
    ops = Counter()
    for line in _longest_loop(sass):
        if m := re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line):
            ops[m.group(1).split(".")[0]] += 1
            ops["all"] += 1
            if m.group(1).startswith("WARPGROUP.DEPBAR"):
                ops["HGMMA wait"] += 1
    return dict(kernel=name, regs=regs, stack=stack, shared=shared, warps=warps,
                by_regs=REGS_PER_SM // (regs_per_warp * warps), by_smem=SMEM_PER_SM // (shared + 1024),
                loop_all=ops["all"], loop_bar=ops["BAR"], loop_hgmma=ops["HGMMA"], loop_waits=ops["HGMMA wait"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", choices=["sweep", "shipped"], default="sweep")
    ap.add_argument("--T", type=int, default=65536)
    args = ap.parse_args()
    calls: list = []
    compile_only(calls)
    import bench_lightning as bench  # after the driver switch: it imports the kernels

    shipped = [bench.LT.DEFAULT_CONFIG, bench.LT.LOOKBACK_CONFIG, bench.TWO_PASS]
    configs = bench.SWEEP if args.configs == "sweep" else shipped
    q = torch.empty(1, bench.H, args.T, bench.D, dtype=torch.bfloat16)
    ld = torch.empty(bench.H)
    print(f"triton {triton.__version__}, sm_90, bf16, 1 x {bench.H} heads x {args.T} tokens x d {bench.D}")
    print("| config | kernel | regs | stack B | shared KB | warps | programs/SM (regs, smem) | walk loop: instr / "
          "barriers / HGMMA / HGMMA waits per chunk |\n|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        calls.clear()
        with torch.no_grad():
            bench.LT.lightning_attn_chunked_triton(q, q, q, ld, config=cfg)
        for name, kernel in calls:
            r = describe(name, kernel)
            print(f"| {bench.short(cfg)} | {name} | {r['regs']} | {r['stack']} | {r['shared'] / 1024:.0f} | "
                  f"{r['warps']} | {min(r['by_regs'], r['by_smem'])} ({r['by_regs']}, {r['by_smem']}) | "
                  f"{r['loop_all']} / {r['loop_bar']} / {r['loop_hgmma']} / {r['loop_waits']} |", flush=True)


if __name__ == "__main__":
    main()
