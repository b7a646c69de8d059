"""`hybridize push`: publish a hybrid model folder on the Hugging Face Hub with a model card.

The card (README.md of the upload) carries Hub metadata (base_model, library_name, tags, pipeline_tag), the layer map,
how the model was made (config.json's `conversion` record) and trained (recipe.json / trainer_state.json), and any
eval/bench results found in the folder (eval_results.md, bench_results.md and their plots). A README.md already in the
folder (written by convert or train) is kept as the body of the card; the upload never changes the folder itself.

The only network boundary is `huggingface_hub.HfApi`: create_repo, create_branch (for --revision) and one
create_commit holding every file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import click

LIBRARY_NAME = "transformers"
PIPELINE_TAG = "text-generation"
TAGS = ["hybridize", "hybrid-attention", "linear-attention", "lightning-attention", "sparse-attention", "infllm-v2"]
# Never uploaded: caches, temporary folders of atomic writes, checkpoints of interrupted runs, Python byte code.
EXCLUDE_DIRS = {"__pycache__", ".git", ".cache", ".ipynb_checkpoints"}
EXCLUDE_SUFFIXES = (".pyc", ".lock", ".tmp")
RESULT_NAMES = ("eval_results", "bench_results")
KNOWN_BASES = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class HubError(OSError):
    """A push that cannot go ahead (no token, offline, the Hub refused); the message is one line."""


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    files: list[str]  # paths in the repo, sorted; README.md is the generated card
    card: str
    private: bool = False
    revision: str | None = None
    replaced: list[str] = field(default_factory=list)  # folder files the upload replaces (README.md)

    def describe(self) -> str:
        lines = [f"would push {len(self.files)} files to {self.repo_id}"
                 + (f" (branch {self.revision})" if self.revision else "")
                 + (" as a private repo" if self.private else "") + ":"]
        for f in self.files:
            size = (self.folder / f).stat().st_size if f != "README.md" else len(self.card.encode())
            note = " (generated model card)" if f == "README.md" else ""
            lines.append(f"  {f}  {size:,} bytes{note}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Files and card
# ---------------------------------------------------------------------------------------------------------------------
def upload_files(folder: Path) -> list[str]:
    """Repo paths of every file under `folder` that goes up (README.md always: the card)."""
    out = {"README.md"}
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if not path.is_file() or any(p in EXCLUDE_DIRS or p.startswith(".") for p in rel.parts):
            continue
        if rel.name.endswith(EXCLUDE_SUFFIXES):
            continue
        out.add(rel.as_posix())
    return sorted(out)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: give a model folder written by hybridize")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _check_hybrid(folder: Path) -> None:
    """The card tags every upload as a hybrid: a dense folder would be published under the wrong name."""
    from .export import is_hybrid_folder

    config = _read_config(folder)
    if not is_hybrid_folder(folder):
        raise ValueError(f"{folder} is not a hybrid model folder (its config.json has model_type "
                         f"{config.get('model_type')!r}): push a folder written by `hybridize convert` or `train`")


def split_front_matter(text: str) -> tuple[str, str]:
    """('---\\n...\\n---' block or '', the rest) of a markdown file."""
    m = re.match(r"^---\n.*?\n---\n?", text, flags=re.S)
    return (m.group(0), text[m.end():]) if m else ("", text)


def base_model_of(config: dict, override: str | None = None) -> str | None:
    """A hub id for `base_model`: --base-model, else the conversion source when it is a hub id or a known model."""
    if override:
        return override
    source = str((config.get("conversion") or {}).get("source") or "")
    for name, repo in KNOWN_BASES.items():
        if name in source:
            return repo
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not Path(source).exists():
        return source
    return None


def layer_map(layer_types: list[str]) -> str:
    return "".join("S" if t in ("full_attention", "sparse") else "L" for t in layer_types)


def _front_matter(base_model: str | None, extra_tags: list[str]) -> str:
    lines = ["---", f"library_name: {LIBRARY_NAME}", f"pipeline_tag: {PIPELINE_TAG}"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("tags:")
    lines += [f"- {t}" for t in TAGS + [t for t in extra_tags if t not in TAGS]]
    lines.append("---")
    return "\n".join(lines) + "\n"


def _training_section(folder: Path) -> str:
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


def model_card(folder: str | Path, repo_id: str, *, base_model: str | None = None,
               files: list[str] | None = None) -> str:
    """The README.md that goes up with `folder`."""
    folder = Path(folder)
    config = _read_config(folder)
    files = files if files is not None else upload_files(folder)
    conversion = config.get("conversion") or {}
    types = config.get("layer_types") or []
    base = base_model_of(config, base_model)
    name = repo_id.split("/")[-1]
    existing = ""
    if (folder / "README.md").is_file():
        _, existing = split_front_matter((folder / "README.md").read_text())
    out = [_front_matter(base, [config.get("source_model_type")] if config.get("source_model_type") else [])]
    if existing.strip():
        out.append(existing.strip() + "\n")
    else:
        out.append(f"# {name}\n\nA Lightning + InfLLM-V2 sparse hybrid made with "
                   "`hybridize` from a dense Llama-family model.\n")
    if types and "## Layer map" not in existing:
        sparse = [i for i, t in enumerate(types) if t in ("full_attention", "sparse")]
        out.append(f"## Layer map\n\n`S` = sparse attention (InfLLM-V2), `L` = Lightning linear attention, layer 0 "
                   f"first ({len(sparse)} sparse of {len(types)}: {sparse}):\n\n    {layer_map(types)}\n")
    if conversion and "source format" not in existing:
        rows = "\n".join(f"| {k} | {v} |" for k, v in conversion.items())
        out.append(f"## How it was made\n\n| | |\n|---|---|\n{rows}\n")
    if "## Stages" not in existing:
        training = _training_section(folder)
        if training:
            out.append(training)
    results = _results_sections(folder, files)
    if results:
        out.append(results)
    if "## Use" not in existing:
        out.append("## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                   f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)\n'
                   f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```\n')
    return "\n".join(out)


def plan_push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
              base_model: str | None = None) -> PushPlan:
    """Everything a push would do, without touching the network."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the model folder to push")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id or ""):
        raise ValueError(f"REPO_ID must look like user/name, got {repo_id!r}")
    _check_hybrid(folder)
    files = upload_files(folder)
    card = model_card(folder, repo_id, base_model=base_model, files=files)
    replaced = ["README.md"] if (folder / "README.md").is_file() else []
    return PushPlan(folder, repo_id, files, card, private, revision, replaced)


# ---------------------------------------------------------------------------------------------------------------------
# The network boundary
# ---------------------------------------------------------------------------------------------------------------------
def hub_token(token: str | None = None) -> str:
    """The token to push with: `token`, else HF_TOKEN / the `hf auth login` cache. One-line errors otherwise."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise HubError("HF_HUB_OFFLINE is set: unset it to push (or use --dry-run to see what would be uploaded)")
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (or use --dry-run)")
    return found


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    # huggingface_hub.errors.HTTPError is the base error of whichever HTTP client this huggingface_hub uses
    # (requests, httpx, or httpx2 in 2.x); the clients are listed too for what raises outside huggingface_hub.
    for module, name in (("huggingface_hub.errors", "HfHubHTTPError"), ("huggingface_hub.errors", "HTTPError"),
                         ("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def execute_push(plan: PushPlan, token: str, api=None) -> str:
    """Create the repo (and branch), then upload every file and the card in one commit. Returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api if api is not None else HfApi(token=token)
    errors = _network_errors()
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        if plan.revision and plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True, repo_type="model")
        ops = []
        for f in plan.files:
            content = plan.card.encode() if f == "README.md" else str(plan.folder / f)
            ops.append(CommitOperationAdd(path_in_repo=f, path_or_fileobj=content))
        info = api.create_commit(plan.repo_id, operations=ops, commit_message="Upload hybrid model with hybridize",
                                 revision=plan.revision, repo_type="model")
    except errors as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubError(f"could not push to {plan.repo_id} on the Hugging Face Hub: {first}") from None
    return str(getattr(info, "commit_url", None) or getattr(info, "pr_url", None) or f"https://huggingface.co/"
               f"{plan.repo_id}")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                dry_run: bool = False, token: str | None = None, base_model: str | None = None, api=None):
    """Push `folder` to `repo_id`. With dry_run, returns the plan without touching the network or needing a token."""
    plan = plan_push(folder, repo_id, private=private, revision=revision, base_model=base_model)
    if dry_run:
        return plan
    return execute_push(plan, hub_token(token), api=api)


@click.command("push")
@click.argument("model", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the repo as private")
@click.option("--revision", default=None, help="branch to push to (created when missing)")
@click.option("--dry-run", is_flag=True, help="list exactly what would be uploaded and print the card; no network")
@click.option("--base-model", default=None, help="hub id for the card's base_model (default: from the conversion)")
@click.option("--token", default=None, envvar="HF_TOKEN", help="Hub token (default: HF_TOKEN or `hf auth login`)")
def push_command(model, repo_id, private, revision, dry_run, base_model, token):
    """Publish MODEL (a hybrid folder) as REPO_ID on the Hugging Face Hub, with a model card."""
    from .errors import _fail_cleanly

    result = _fail_cleanly(push_folder, model, repo_id, private=private, revision=revision, dry_run=dry_run,
                           token=token, base_model=base_model)
    if isinstance(result, PushPlan):
        click.echo(result.describe())
        click.echo("\n--- README.md ---\n" + result.card)
    else:
        click.echo(f"pushed {model} to {repo_id}: {result}")


__all__ = ["HubError", "PushPlan", "execute_push", "hub_token", "model_card", "plan_push", "push_command",
           "push_folder", "upload_files"]
