"""SmolLM2-135M at 3 bits per weight, to move it to a lent GPU machine in one 64 MiB transfer (the GGUF is 98 MB).

Transport glue for this workplace's device machine (tools/README.md), not a benchmark: the re-quantised model is a
stand-in for SmolLM2 in training-speed and FSDP comparisons, where its weights only need to be SmolLM2-like.

    python tools/smollm2_3bit.py pack --out FILE.npz       (here: the built-in SmolLM2 weights at 3 bits)
    python tools/smollm2_3bit.py unpack FILE.npz --out DIR (there: a Hugging Face folder of the re-quantised model)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def _quant3(w: np.ndarray, group: int = 128):
    flat = w.astype(np.float32).reshape(-1)
    pad = (-len(flat)) % group
    flat = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, group)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    scale = np.maximum(hi - lo, 1e-8) / 7.0
    q = np.clip(np.rint((flat - lo) / scale), 0, 7).astype(np.uint8).reshape(-1)
    bits = np.packbits(((q[:, None] >> np.arange(3, dtype=np.uint8)) & 1).astype(np.uint8).reshape(-1))
    return bits, lo.astype(np.float16).reshape(-1), scale.astype(np.float16).reshape(-1)


def _dequant3(bits, lo, scale, shape, group: int = 128) -> np.ndarray:
    n = int(np.prod(shape))
    total = n + (-n) % group
    planes = np.unpackbits(bits)[: total * 3].reshape(-1, 3)
    q = (planes * np.array([1, 2, 4], np.uint8)).sum(1).astype(np.float32).reshape(-1, group)
    w = q * scale.astype(np.float32)[:, None] + lo.astype(np.float32)[:, None]
    return w.reshape(-1)[:n].reshape(shape)


def cmd_pack(args) -> int:
    from hybridize.convert.default_model import load_default_model

    model, tok = load_default_model()
    arrays = {"config": np.frombuffer(json.dumps(model.config.to_dict()).encode(), np.uint8)}
    tdir = Path(args.out).with_suffix(".tok")
    tok.save_pretrained(tdir)
    arrays["tokenizer"] = np.frombuffer((tdir / "tokenizer.json").read_bytes(), np.uint8)
    arrays["tokenizer_config"] = np.frombuffer((tdir / "tokenizer_config.json").read_bytes(), np.uint8)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        w = t.float().numpy()
        if w.ndim == 2:
            b, lo, sc = _quant3(w)
            arrays[f"q3:{name}:bits"], arrays[f"q3:{name}:lo"], arrays[f"q3:{name}:scale"] = b, lo, sc
            arrays[f"q3:{name}:shape"] = np.array(w.shape)
        else:
            arrays[f"f32:{name}"] = w
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_unpack(args) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    f = np.load(args.file)
    cfg = json.loads(bytes(f["config"]).decode())
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k not in ("_name_or_path",)})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {}
    for key in f.files:
        if key.startswith("f32:"):
            state[key[4:]] = torch.from_numpy(f[key])
        elif key.startswith("q3:") and key.endswith(":bits"):
            name = key[3:-5]
            shape = tuple(int(x) for x in f[f"q3:{name}:shape"])
            state[name] = torch.from_numpy(_dequant3(f[key], f[f"q3:{name}:lo"], f[f"q3:{name}:scale"], shape))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    model.tie_weights()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(bytes(f["tokenizer"]))
    (out / "tokenizer_config.json").write_bytes(bytes(f["tokenizer_config"]))
    PreTrainedTokenizerFast.from_pretrained(out)  # loads
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", required=True)
    u = sub.add_parser("unpack")
    u.add_argument("file")
    u.add_argument("--out", required=True)
    args = ap.parse_args()
    return {"pack": cmd_pack, "unpack": cmd_unpack}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
