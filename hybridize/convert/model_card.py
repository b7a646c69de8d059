"""README.md of a converted folder: what it was made from, its layer map, how, and with which hybridize."""

from __future__ import annotations

from ..arch.configuration_hybridize import SPARSE


def layer_map_string(layer_types: list[str]) -> str:
    """One character per layer: S = sparse attention (InfLLM-V2), L = Lightning linear attention."""
    return "".join("S" if t == SPARSE else "L" for t in layer_types)


def model_card(
    *,
    name: str,
    source: str,
    source_format: str,
    family: str,
    layer_types: list[str],
    method: str,
    ratio: str | None,
    hype: bool,
    gates: bool,
    dtype: str,
    version: str,
    base_model: str | None = None,
) -> str:
    sparse = [i for i, t in enumerate(layer_types) if t == SPARSE]
    n, s = len(layer_types), len(sparse)
    how = f"`{method}` placement" + (f", ratio {ratio} (sparse:linear)" if ratio and method != "layers" else "")
    front = ["---", "library_name: transformers", "tags:", "- hybridize", "- linear-attention", "- sparse-attention"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = front + [
        "",
        f"# {name}",
        "",
        f"A hybrid of **{source}** made by `hybridize convert` (hybridize {version}): {s} of its {n} layers keep "
        "softmax attention, run as InfLLM-V2 sparse attention; the other layers are Lightning linear attention, "
        "initialised from the same weights.",
        "",
        "| | |",
        "|---|---|",
        f"| source | {source} |",
        f"| source format | {source_format} |",
        f"| family | {family} |",
        f"| layers | {n}: {s} sparse, {n - s} Lightning |",
        f"| sparse layers | {sparse} |",
        f"| layer selection | {how} |",
        f"| HyPE (NoPE in sparse layers, RoPE in Lightning) | {'on' if hype else 'off'} |",
        f"| output gates | {'on' if gates else 'off'} |",
        f"| dtype | {dtype} |",
        f"| hybridize version | {version} |",
        "",
        "## Layer map",
        "",
        "`S` = sparse attention, `L` = Lightning, layer 0 first:",
        "",
        f"    {layer_map_string(layer_types)}",
        "",
        "The same map is `layer_types` in config.json.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)',
        "```",
        "",
        "The architecture files in this folder are all it needs (hybridize itself need not be installed).",
        "A fresh conversion has not been trained: its Lightning layers start from the attention weights, so quality",
        "is below the source until the model is trained (`hybridize train`).",
        "",
    ]
    return "\n".join(lines)
