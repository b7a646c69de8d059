"""hybridize: turn a dense Llama-family Transformer into a Lightning + InfLLM-V2 sparse hybrid.

The public API, one function per step of the walkthrough (each the function its command calls):

    import hybridize
    hybridize.convert(source, output, ratio="1:3")      # -> ConvertResult
    hybridize.score(source, output, settings)           # -> ScoreResult
    hybridize.train(hybridize.load_recipe("recipes/demo.yaml"))
    hybridize.evaluate(model, compare=source)           # perplexity, retrieval, samples
    hybridize.retention(model, compare=source)          # what the conversion kept of the source
    hybridize.bench(model, compare=source)              # prefill/decode speed and memory
    hybridize.push(model, "user/name", dry_run=True)

Each name is imported on first use, so `import hybridize` (and so `hybridize --help`) loads neither torch nor
transformers.

`convert` and `train` are also the names of subpackages. Here they mean the functions: reach the subpackages' modules
with `from hybridize.train import losses` or `import hybridize.train.losses` (not `import hybridize.train.losses as
losses`, which looks the name up on this package and finds the function).
"""

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute"
_API = {
    "convert": "hybridize.convert.converter:convert",
    "score": "hybridize.select.api:score",
    "ScoreSettings": "hybridize.select.api:ScoreSettings",
    "train": "hybridize.train.trainer:train",
    "load_recipe": "hybridize.train.recipe:load_recipe",
    "recipe_from_dict": "hybridize.train.recipe:recipe_from_dict",
    "evaluate": "hybridize.eval.evaluate:run_eval",
    "EvalSettings": "hybridize.eval.evaluate:EvalSettings",
    "retention": "hybridize.eval.retention:run_retention",
    "bench": "hybridize.eval.evaluate:run_bench_command",
    "push": "hybridize.hub:push_folder",
    "HybridConfig": "hybridize.arch.configuration_hybridize:HybridConfig",
    "HybridForCausalLM": "hybridize.arch.modeling_hybridize:HybridForCausalLM",
}

__all__ = ["__version__", *_API]

# Importing a subpackage binds its name on this package, which would hide the function of the same name from
# __getattr__ for the rest of the process. Load the two (empty) subpackages now and unbind their names, so that
# `hybridize.convert` and `hybridize.train` are the functions whatever was imported before.
for _package in ("convert", "train"):
    importlib.import_module(f"{__name__}.{_package}")
    del globals()[_package]
del _package


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _API[name].split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
