"""Peak memory (RSS) of `hybridize convert` on a ~1 GB random Llama checkpoint, against building the hybrid in memory.

Each measurement runs in a fresh process that reports its own peak RSS (getrusage ru_maxrss):
  import     - importing torch, transformers and hybridize.convert (the floor every variant pays)
  streaming  - hybridize.convert.converter.convert (reads tensor by tensor, writes planned safetensors shards)
  in-memory  - the peer: from_pretrained the source, build_hybrid, save_hybrid (two models in memory)
for the source as a sharded safetensors folder and as a single .pt state dict (memory-mapped torch.load).

    python bench/convert_memory.py [--workdir /tmp/convert-memory] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
             num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)

MAKE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from transformers import LlamaConfig, AutoModelForCausalLM
folder = Path(sys.argv[1]); folder.mkdir(parents=True)
config = LlamaConfig(**json.loads(sys.argv[2]), dtype="bfloat16")
config.save_pretrained(folder)
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
names = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
shards, current, size, weight_map = [], {}, 0, {}
gen = torch.Generator().manual_seed(0)
def flush():
    global current, size
    if current:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, folder / name); shards.append(name)
        weight_map.update({k: name for k in current}); current, size = {}, 0
for n, shape in names:
    t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) if len(shape) > 1 else torch.ones(shape, dtype=torch.bfloat16)
    current[n] = t; size += t.numel() * 2
    if size > 400_000_000: flush()
flush()
total = sum((folder / s).stat().st_size for s in shards)
(folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
# the same weights as one .pt state dict with config.json beside it
single = folder.parent / "single"; single.mkdir()
config.save_pretrained(single)
from safetensors.torch import load_file
state = {}
for s in shards: state.update(load_file(folder / s))
torch.save(state, single / "weights.pt")
print(json.dumps({"bytes": total, "params": sum(t.numel() for t in state.values())}))
"""

MEASURE = """
import json, resource, sys, time
t0 = time.time()
import torch, transformers
from hybridize.convert import converter
mode, source, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "streaming":
    converter.convert(source, out, ratio="1:3", progress=False)
elif mode == "in-memory":
    from transformers import AutoModelForCausalLM
    from hybridize.convert.build import build_hybrid
    from hybridize.export import save_hybrid
    from hybridize.select.placement import layer_types_from, uniform_layers
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    L = model.config.num_hidden_layers
    hybrid = build_hybrid(model, layer_types_from(L, uniform_layers(L, L // 4)))
    save_hybrid(hybrid, out)
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": time.time() - t0}))
"""


def run(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/convert-memory")
    parser.add_argument("--keep", action="store_true", help="keep the random checkpoint and outputs")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    made = run(MAKE, str(work / "folder"), json.dumps(SHAPE))
    gb = made["bytes"] / 1e9
    print(f"source: random Llama, {made['params'] / 1e6:.0f}M parameters, bfloat16, {gb:.2f} GB of weights")
    rows = [("import only", "-", run(MEASURE, "import", "-", "-"))]
    for label, source in (("safetensors folder (3 shards)", work / "folder"), ("single .pt + config.json", work / "single" / "weights.pt")):
        rows.append((label, "streaming (hybridize convert)", run(MEASURE, "streaming", str(source), str(work / "out"))))
        shutil.rmtree(work / "out")
        if label.startswith("safetensors"):
            rows.append((label, "in-memory (from_pretrained + build_hybrid + save_hybrid)",
                         run(MEASURE, "in-memory", str(source), str(work / "out"))))
            shutil.rmtree(work / "out")
    print("\n| source | method | peak RSS (MiB) | wall (s) |\n|---|---|---|---|")
    for label, method, r in rows:
        print(f"| {label} | {method} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
