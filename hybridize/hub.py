"""`hybridize push`: publish a hybrid model folder on the Hugging Face Hub with a model card.

The card (README.md of the upload, built by hybridize.card) carries Hub metadata (base_model, library_name, tags, pipeline_tag), the layer map,
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

from .card import Upload, model_card

# Never uploaded: caches, temporary folders of atomic writes, checkpoints of interrupted runs, Python byte code.
EXCLUDE_DIRS = {"__pycache__", ".git", ".cache", ".ipynb_checkpoints"}
EXCLUDE_SUFFIXES = (".pyc", ".lock", ".tmp")


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
# Files (the card: hybridize.card)
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


def _check_hybrid(folder: Path, config: dict) -> None:
    """The card tags every upload as a hybrid: a dense folder would be published under the wrong name."""
    from .export import is_hybrid_folder

    if not is_hybrid_folder(folder):
        raise ValueError(f"{folder} is not a hybrid model folder (its config.json has model_type "
                         f"{config.get('model_type')!r}): push a folder written by `hybridize convert` or `train`")


def plan_push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
              base_model: str | None = None) -> PushPlan:
    """Everything a push would do, without touching the network."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the model folder to push")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id or ""):
        raise ValueError(f"REPO_ID must look like user/name, got {repo_id!r}")
    config = _read_config(folder)
    _check_hybrid(folder, config)
    files = upload_files(folder)
    card = model_card(upload=Upload(folder, repo_id, config, files, base_model))
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


__all__ = ["HubError", "PushPlan", "execute_push", "hub_token", "plan_push", "push_command", "push_folder",
           "upload_files"]
