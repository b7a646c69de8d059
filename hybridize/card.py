"""Model cards (README.md of a hybrid folder): one front matter with one tag list, and one builder for every step.

Each step gives what it knows: `hybridize convert` the conversion (Conversion), `hybridize train` the run
(Training), `hybridize push` the folder and repo id (Upload). A push keeps the card convert or train wrote as its body
and adds only the sections that card lacks, so the uploaded card and the folder's own card never disagree.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .arch.configuration_hybridize import SPARSE

LIBRARY_NAME = "transformers"
PIPELINE_TAG = "text-generation"
TAGS = ["hybridize", "hybrid-attention", "linear-attention", "lightning-attention", "sparse-attention", "infllm-v2"]
# Folders written before the layer types took transformers' names call the sparse layers "sparse".
SPARSE_TYPES = (SPARSE, "sparse")
RESULT_NAMES = ("eval_results", "bench_results")
KNOWN_BASES = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class Conversion:
    """What `hybridize convert` knows about the folder it wrote."""

    name: str
    source: str
    source_format: str
    family: str
    layer_types: list[str]
    method: str
    ratio: str | None
    hype: bool
    gates: bool
    dtype: str
    version: str
    base_model: str | None = None


@dataclass
class Training:
    """What `hybridize train` measured: the stages it ran (the trainer's per-stage records) and the totals."""

    description: str
    stages: list[dict]
    tokens: int
    steps: int
    metrics: dict = field(default_factory=dict)  # final held-out metrics
    sources: list = field(default_factory=list)  # the recipe's data sources (type, path, weight)


@dataclass
class Upload:
    """What `hybridize push` knows: the folder, its config.json, the files that go up and the repo id."""

    folder: Path
    repo_id: str
    config: dict
    files: list[str]
    base_model: str | None = None  # --base-model; else derived from the conversion source


def layer_map(layer_types: list[str]) -> str:
    """One character per layer: S = sparse attention (InfLLM-V2), L = Lightning linear attention."""
    return "".join("S" if t in SPARSE_TYPES else "L" for t in layer_types)


def split_front_matter(text: str) -> tuple[str, str]:
    """('---\\n...\\n---' block or '', the rest) of a markdown file."""
    m = re.match(r"^---\n.*?\n---\n?", text, flags=re.S)
    return (m.group(0), text[m.end():]) if m else ("", text)


def base_model_of(config: dict, override: str | None = None) -> str | None:
    """A hub id for `base_model`: the override, else the conversion source when it is a hub id or a known model."""
    if override:
        return override
    source = str((config.get("conversion") or {}).get("source") or "")
    for name, repo in KNOWN_BASES.items():
        if name in source:
            return repo
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not Path(source).exists():
        return source
    return None


def front_matter(base_model: str | None = None, extra_tags: list[str] = ()) -> str:
    lines = ["---", f"library_name: {LIBRARY_NAME}", f"pipeline_tag: {PIPELINE_TAG}"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("tags:")
    lines += [f"- {t}" for t in TAGS + [t for t in extra_tags if t not in TAGS]]
    lines.append("---")
    return "\n".join(lines) + "\n"


def model_card(*, conversion: Conversion | None = None, training: Training | None = None,
               upload: Upload | None = None) -> str:
    """The README.md text of a hybrid folder from what the calling step knows (give one of the three)."""
    given = [x for x in (conversion, training, upload) if x is not None]
    if len(given) != 1:
        raise TypeError("model_card: give exactly one of conversion, training or upload")
    if conversion is not None:
        return front_matter(conversion.base_model) + "\n" + _conversion_body(conversion)
    if training is not None:
        return front_matter() + "\n" + _training_body(training)
    return _upload_card(upload)


def write_card(folder: Path, text: str) -> Path:
    """README.md written atomically: a reader never sees half a card."""
    path = Path(folder) / "README.md"
    tmp = path.with_name(".README.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------------
def _conversion_body(c: Conversion) -> str:
    sparse = [i for i, t in enumerate(c.layer_types) if t in SPARSE_TYPES]
    n, s = len(c.layer_types), len(sparse)
    how = f"`{c.method}` placement" + (f", ratio {c.ratio} (sparse:linear)" if c.ratio and c.method != "layers" else "")
    lines = [
        f"# {c.name}",
        "",
        f"A hybrid of **{c.source}** made by `hybridize convert` (hybridize {c.version}): {s} of its {n} layers keep "
        "softmax attention, run as InfLLM-V2 sparse attention; the other layers are Lightning linear attention, "
        "initialised from the same weights.",
        "",
        "| | |",
        "|---|---|",
        f"| source | {c.source} |",
        f"| source format | {c.source_format} |",
        f"| family | {c.family} |",
        f"| layers | {n}: {s} sparse, {n - s} Lightning |",
        f"| sparse layers | {sparse} |",
        f"| layer selection | {how} |",
        f"| HyPE (NoPE in sparse layers, RoPE in Lightning) | {'on' if c.hype else 'off'} |",
        f"| output gates | {'on' if c.gates else 'off'} |",
        f"| dtype | {c.dtype} |",
        f"| hybridize version | {c.version} |",
        "",
        "## Layer map",
        "",
        "`S` = sparse attention, `L` = Lightning, layer 0 first:",
        "",
        f"    {layer_map(c.layer_types)}",
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


# ---------------------------------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------------------------------
def _stage_row(s: dict) -> str:
    loss = s["loss"]
    kl = f"{loss['kl']} ({s['kl_direction']}, T={s['temperature']})" if loss["kl"] else "0"
    ho = f"{s['heldout_loss']:.4f}" if "heldout_loss" in s else "-"
    ppl = f"{s['heldout_ppl']:.3f}" if "heldout_ppl" in s else "-"
    return (f"| {s['name']} | {s['seq_len']} | {s['steps']} | {s['tokens']:,} | {s['lr']:g} | {s['schedule']} | "
            f"{s['trainable']} | {loss['hidden_mse']} / {kl} / {loss['ce']} | {ho} | {ppl} |")


def _training_body(t: Training) -> str:
    lines = [
        "# Hybrid model trained with `hybridize train`",
        "",
        f"Start: {t.description}.",
        "",
        "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.",
        "",
        "## Stages",
        "",
        "| stage | seq len | steps | tokens | lr | schedule | trains | loss (hidden MSE / KL / CE) | held-out loss | held-out ppl |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(_stage_row(s) for s in t.stages),
        "",
        f"Total training tokens: {t.tokens:,} in {t.steps} optimizer steps.",
        "",
    ]
    if t.metrics:
        lines += ["Final held-out metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in t.metrics.items()) + ".", ""]
    lines += ["Data sources: " + ", ".join(f"{s.type}:{s.path or 'teacher samples'} (weight {s.weight})"
                                           for s in t.sources) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------------------
def _recipe_section(folder: Path) -> str:
    """The stages of recipe.json, for a folder whose own card does not list them."""
    recipe_file = folder / "recipe.json"
    if not recipe_file.is_file():
        return ""
    try:
        recipe = json.loads(recipe_file.read_text())
    except json.JSONDecodeError:
        return ""
    rows = []
    for i, st in enumerate(recipe.get("stages", [])):
        rows.append(f"| {st.get('name', i)} | {st.get('seq_len', '-')} | {st.get('tokens', st.get('steps', '-'))} | "
                    f"{st.get('lr', '-')} | {st.get('train', st.get('trainable', '-'))} |")
    text = "## Training\n\nStages of the `hybridize train` recipe (recipe.json in this repo):\n\n"
    if rows:
        text += "| stage | seq len | tokens / steps | lr | trains |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    return text


def _results_sections(folder: Path, files: list[str]) -> str:
    """Markdown of the eval/bench results found in the folder, with their plots linked."""
    parts = []
    for stem in RESULT_NAMES:
        for md in sorted(f for f in files if Path(f).name == f"{stem}.md"):
            text = (folder / md).read_text().strip()
            parent = Path(md).parent
            plots = sorted(f for f in files if f.endswith(".png") and Path(f).parent == parent
                           and (Path(f).name.startswith("bench_") if stem == "bench_results"
                                else not Path(f).name.startswith("bench_")))
            text = re.sub(r"^## [^\n]*\n+", "", text, count=1)  # the file's own title: the section has one
            body = re.sub(r"^## ", "### ", text, flags=re.M)
            section = f"## {'Evaluation' if stem == 'eval_results' else 'Speed'} (`{md}`)\n\n{body}\n"
            section += "".join(f"\n![{Path(p).stem}]({p})\n" for p in plots)
            parts.append(section)
    return "\n".join(parts)


def _upload_card(u: Upload) -> str:
    folder, config = Path(u.folder), u.config
    conversion = config.get("conversion") or {}
    types = config.get("layer_types") or []
    existing = ""
    if (folder / "README.md").is_file():
        _, existing = split_front_matter((folder / "README.md").read_text())
    source_type = config.get("source_model_type")
    out = [front_matter(base_model_of(config, u.base_model), [source_type] if source_type else [])]
    if existing.strip():
        out.append(existing.strip() + "\n")
    else:
        out.append(f"# {u.repo_id.split('/')[-1]}\n\nA Lightning + InfLLM-V2 sparse hybrid made with "
                   "`hybridize` from a dense Llama-family model.\n")
    if types and "## Layer map" not in existing:
        sparse = [i for i, t in enumerate(types) if t in SPARSE_TYPES]
        out.append(f"## Layer map\n\n`S` = sparse attention (InfLLM-V2), `L` = Lightning linear attention, layer 0 "
                   f"first ({len(sparse)} sparse of {len(types)}: {sparse}):\n\n    {layer_map(types)}\n")
    if conversion and "source format" not in existing:
        rows = "\n".join(f"| {k} | {v} |" for k, v in conversion.items())
        out.append(f"## How it was made\n\n| | |\n|---|---|\n{rows}\n")
    if "## Stages" not in existing:
        training = _recipe_section(folder)
        if training:
            out.append(training)
    results = _results_sections(folder, u.files)
    if results:
        out.append(results)
    if "## Use" not in existing:
        out.append("## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   f'model = AutoModelForCausalLM.from_pretrained("{u.repo_id}", trust_remote_code=True)\n'
                   f'tokenizer = AutoTokenizer.from_pretrained("{u.repo_id}")\n```\n')
    return "\n".join(out)


__all__ = ["Conversion", "TAGS", "Training", "Upload", "base_model_of", "front_matter", "layer_map", "model_card",
           "split_front_matter", "write_card"]
