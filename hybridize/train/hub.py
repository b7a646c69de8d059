"""`push_to_hub` of a recipe: hands the exported folder to hybridize.hub (built separately)."""

from __future__ import annotations

import importlib


def push_trained(folder, spec) -> None:
    try:
        hub = importlib.import_module("hybridize.hub")
    except ModuleNotFoundError as e:
        if e.name != "hybridize.hub":
            raise
        hub = None
    push = getattr(hub, "push_folder", None) if hub is not None else None
    if push is None:
        # TODO: call hybridize.hub once it exposes push_folder(folder, repo_id, private=...).
        raise NotImplementedError(f"push_to_hub: hybridize.hub.push_folder is not available in this build; the model "
                                  f"is saved in {folder}: publish it with `hybridize push {folder}` when that exists")
    push(folder, spec.repo_id, private=spec.private)
