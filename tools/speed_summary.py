"""Issue 18's numbers from one tools/speed_device.sh run, one line each, beside its peer from the same run.

    python3 tools/speed_summary.py DIR [--out DIR/summary.md]

DIR holds what the run wrote (any of them may be missing: that part's lines say so):
  prefill_results.jsonl, prefill_info.json, prefill_fit.json   bench/bench_model.py (results.jsonl, info.json, fit.json)
  throughput.json                                              bench/train_quality.py throughput
  lightning.json                                               bench/bench_lightning.py --json
Targets (issue 18) are in the last column; "MET" / "missed" where the number is one the issue sets a target for.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

K, M = 1024, 1 << 20


def fmt_len(n: int | None) -> str:
    if not n:
        return "-"
    if n % M == 0:
        return f"{n // M}M"
    if n % K == 0:
        return f"{n // K}K"
    return str(n)


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" MET" if ok else " missed")


class Table:
    def __init__(self):
        self.lines = ["| number | value | peer (same run) | ratio | target |", "|---|---|---|---|---|"]

    def add(self, what, value, peer="-", ratio="-", target="-"):
        self.lines.append(f"| {what} | {value} | {peer} | {ratio} | {target} |")

    def text(self) -> str:
        return "\n".join(self.lines)


def model_rows(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["model"], {})[r["length"]] = r
    return out


def decode_points(r: dict | None) -> dict[int, object]:
    if not r:
        return {}
    return {int(b): v for b, v in (r.get("decode_tok_s") or {}).items()}


def largest_batch(r: dict | None) -> tuple[int, float] | None:
    ok = [(b, v) for b, v in decode_points(r).items() if isinstance(v, (int, float))]
    return max(ok) if ok else None


def peak_fit(by_len: dict[int, dict], total_gib: float | None) -> int | None:
    """Longest context that fits, extrapolated linearly in the peak memory of the two longest measured prefills."""
    pts = sorted((L, r["peak_gib"]) for L, r in by_len.items() if r.get("status") == "ok" and r.get("peak_gib"))
    if len(pts) < 2 or not total_gib:
        return None
    (l1, p1), (l2, p2) = pts[-2:]
    if p2 <= p1:
        return None
    return int(l2 + (total_gib - p2) * (l2 - l1) / (p2 - p1))


def prefill_part(d: Path, t: Table) -> None:
    rows = load_rows(d / "prefill_results.jsonl")
    if not rows:
        t.add("prefill / decode / 2M (bench_model.py)", "no results")
        return
    info = load_json(d / "prefill_info.json") or {}
    fit = load_json(d / "prefill_fit.json") or {}
    total = info.get("total_gib") or fit.get("total_gib")
    models = model_rows(rows)
    dense = {n: v for n, v in models.items() if n.endswith("(dense)")}
    hybrids = {n: v for n, v in models.items() if not n.endswith("(dense)")}
    one_pass = next((v for n, v in dense.items() if "one-pass" in n), None)
    chunked = next((v for n, v in dense.items() if "one-pass" not in n), None)
    if not hybrids:
        t.add("hybrid prefill", "no results")
        return
    hname, hyb = next(iter(hybrids.items()))

    def ttft(by_len, L):
        r = (by_len or {}).get(L)
        if r is None:
            return None, "not run"
        if r["status"] != "ok":
            return None, r["status"] + (f" ({r['note'][:90]})" if r.get("note") else "")
        return r["ttft_s"], f"{r['ttft_s']:.2f} s"

    # 2: time to first token against the faster dense mode at 128K and 256K
    for L, target in ((128 * K, 3.5), (256 * K, 6.5)):
        h, htxt = ttft(hyb, L)
        cands = [(x, f"{txt} ({mode})") for mode, by in (("one-pass", one_pass), ("chunked", chunked)) if by
                 for x, txt in [ttft(by, L)] if x is not None]
        d_best = min(cands, default=(None, "not measured"))
        ratio = f"{d_best[0] / h:.2f}x" if h and d_best[0] else "-"
        ok = (d_best[0] / h >= target) if h and d_best[0] else None
        t.add(f"TTFT {fmt_len(L)}, hybrid vs dense SDPA", htxt, d_best[1], ratio, f">= {target}x{verdict(ok)}")
    # 3: the long contexts (the dense model's status at the same length as its peer)
    for L in sorted(x for x in hyb if x > 256 * K):
        r = hyb[L]
        h, htxt = ttft(hyb, L)
        peer = "; ".join(f"{mode}: {ttft(by, L)[1]}" for mode, by in (("one-pass", one_pass), ("chunked", chunked))
                         if by)
        extra = ""
        if h is not None:
            one = decode_points(r).get(1)
            extra = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") else ""
            if isinstance(one, (int, float)):
                extra += f", decode B=1 {one:.1f} tok/s ({1000 / one:.1f} ms/token)"
        t.add(f"hybrid {fmt_len(L)} context: TTFT", htxt + extra, f"dense {peer or 'not run'}")
    dense_done = max((L for by in (one_pass, chunked) if by for L, r in by.items() if r["status"] == "ok"),
                     default=None)
    fits = fit.get("fit_tokens", {})
    d_probe = max((v for n, v in fits.items() if n.endswith("(dense)")), default=None)
    h_probe = fits.get(hname)
    dfit = f"chunked prefill: probe {fmt_len(d_probe)} ({d_probe} tokens)" if d_probe is not None else "no probe"
    op_fit = peak_fit(one_pass or {}, total)
    if op_fit:
        dfit += f"; one-pass: by peak memory ~{op_fit / K:.0f}K"
    hfit = f"probe {fmt_len(h_probe)} ({h_probe} tokens)" if h_probe is not None else "no probe"
    h_ext = peak_fit(hyb, total)
    if h_ext:
        hfit += f"; by peak memory ~{h_ext / M:.2f}M"
    t.add("largest context that fits: hybrid", hfit, f"dense {dfit} (timed up to {fmt_len(dense_done)})",
          f"{h_probe / d_probe:.1f}x (probes)" if h_probe and d_probe else "-",
          f"probe: cache + one {fit.get('chunk', '?')}-token chunk allocated beside the weights, not a prefill; "
          f"peak memory: linear in the two longest prefills, to {total or 0:.0f} GiB")
    # 4: decode at 128K
    L = 128 * K
    dens = [(mode, by.get(L)) for mode, by in (("chunked", chunked), ("one-pass", one_pass)) if by and by.get(L)]
    d_mode, d_row = next(((m, r) for m, r in dens if largest_batch(r)), (None, None))
    d_big = largest_batch(d_row)
    d_oom = [b for b, v in decode_points(d_row).items() if v == "oom"]
    h_row = hyb.get(L)
    h_pts = decode_points(h_row)
    h_big = largest_batch(h_row)
    h_oom = [b for b, v in h_pts.items() if v == "oom"]
    peer = "no dense decode"
    if d_big:
        peer = (f"dense ({d_mode}-prefilled cache) B={d_big[0]}: {d_big[1]:.1f} tok/s"
                + (f" (B={min(d_oom)} out of memory)" if d_oom else " (no larger batch tried)"))
    h8 = h_pts.get(8)
    if isinstance(h8, (int, float)):
        t.add("decode 128K, hybrid B=8", f"{h8:.1f} tok/s", peer, f"{h8 / d_big[1]:.2f}x" if d_big else "-")
    else:
        t.add("decode 128K, hybrid B=8", str(h8 or "not run"), peer)
    if h_big:
        note = f" (B={min(h_oom)} out of memory)" if h_oom else " (no larger batch tried)"
        t.add(f"decode 128K, hybrid at its largest batch B={h_big[0]}", f"{h_big[1]:.1f} tok/s{note}", peer,
              f"{h_big[1] / d_big[1]:.2f}x" if d_big else "-")


def train_part(d: Path, t: Table) -> None:
    info = load_json(d / "throughput.json")
    if not info or not info.get("rows"):
        t.add("training throughput (train_quality.py throughput)", "no results")
        return
    rows = info["rows"]
    for shape in dict.fromkeys(r.get("shape", "smollm2") for r in rows):
        for L in dict.fromkeys(r["seq_len"] for r in rows if r.get("shape", "smollm2") == shape):
            pair = {r["model"]: r for r in rows if r.get("shape", "smollm2") == shape and r["seq_len"] == L}
            h, dn = pair.get("hybrid 1:3", {}), pair.get("dense", {})

            def cell(r):
                if not r:
                    return "not run"
                if "error" in r:
                    return r["error"]
                return f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_step']} tok/step, {r['peak_gib']:.1f} GiB)"

            ratio = (f"{h['tokens_per_s'] / dn['tokens_per_s']:.2f}x" if "tokens_per_s" in h and "tokens_per_s" in dn
                     else "-")
            t.add(f"train {shape} {fmt_len(L)}, hybrid vs dense", cell(h), cell(dn), ratio)


def kernel_part(d: Path, t: Table) -> None:
    info = load_json(d / "lightning.json")
    if not info:
        t.add("Lightning kernels (bench_lightning.py)", "no results")
        return
    bw = info.get("copy_bw")
    rows = info.get("rows", [])
    for T in (16384, 65536):
        r = next((x for x in rows if x.get("T") == T and "ours_fwd_ms" in x), None)
        if r is None:
            t.add(f"Lightning {fmt_len(T)}", "not run")
            continue
        if T == 65536:
            ratio = r["ours_fwd_ms"] / r["floor_fwd_ms"]
            fla = f", fla {r['fla_fwd_ms']:.3f} ms" if "fla_fwd_ms" in r else ""
            t.add("Lightning fwd 64K (B=1, 32 heads, d=128, bf16)", f"{r['ours_fwd_ms']:.3f} ms",
                  f"memory floor {r['floor_fwd_ms']:.3f} ms{fla}", f"{ratio:.2f}x floor",
                  f"<= 1.5x floor{verdict(ratio <= 1.5)}")
        if "fla_fwdbwd_ms" in r:
            ratio = r["ours_fwdbwd_ms"] / r["fla_fwdbwd_ms"]
            t.add(f"Lightning fwd+bwd {fmt_len(T)}", f"{r['ours_fwdbwd_ms']:.3f} ms",
                  f"fla {r['fla_fwdbwd_ms']:.3f} ms", f"{ratio:.2f}x", f"<= 0.6x fla{verdict(ratio <= 0.6)}")
        else:
            t.add(f"Lightning fwd+bwd {fmt_len(T)}", f"{r['ours_fwdbwd_ms']:.3f} ms", "fla not measured")
    r = next((x for x in rows if x.get("batch") == 8 and "ours_graph_ms" in x), None)
    if r is None or not bw:
        t.add("Lightning decode B=8 (CUDA graph)", "not run")
        return
    share = 2 * 8 * 32 * 128 * 128 * 4 / (r["ours_graph_ms"] * 1e-3) / bw
    fla = f"fla {r['fla_graph_ms'] * 1000:.1f} us" if "fla_graph_ms" in r else "fla graph not measured"
    t.add("Lightning decode B=8 (CUDA graph)", f"{r['ours_graph_ms'] * 1000:.1f} us = {100 * share:.0f}% of copy "
          f"bandwidth ({bw / 1e12:.2f} TB/s)", fla, f"{r['fla_graph_ms'] / r['ours_graph_ms']:.2f}x faster"
          if "fla_graph_ms" in r else "-", f">= 90% of copy bandwidth{verdict(share >= 0.9)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = ap.parse_args()
    d = Path(args.dir)
    t = Table()
    for part in (prefill_part, train_part, kernel_part):
        try:
            part(d, t)
        except Exception as exc:  # noqa: BLE001 - one part's odd file must not hide the others
            t.add(part.__name__, f"summary failed: {type(exc).__name__}: {exc}")
    info = load_json(d / "prefill_info.json") or {}
    head = f"issue 18 numbers, one run on {info.get('device', 'the device')} (torch {info.get('torch', '?')})\n"
    print(head + t.text())
    if args.out:
        Path(args.out).write_text(head + "\n" + t.text() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
