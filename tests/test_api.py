"""The public API in hybridize/__init__.py: every name resolves to the library function its command calls, and
`import hybridize` stays cheap (the CLI imports it for `hybridize --help`)."""

from __future__ import annotations

import subprocess
import sys

import hybridize


def test_every_public_name_resolves():
    for name in hybridize.__all__:
        assert getattr(hybridize, name) is not None, name
    assert set(hybridize.__all__) <= set(dir(hybridize))


def test_public_names_are_the_library_functions():
    from hybridize.arch import HybridConfig, HybridForCausalLM
    from hybridize.convert.converter import convert
    from hybridize.eval.evaluate import run_bench_command, run_eval
    from hybridize.eval.retention import run_retention
    from hybridize.hub import push_folder
    from hybridize.select.api import score
    from hybridize.train.recipe import load_recipe
    from hybridize.train.trainer import train

    assert hybridize.convert is convert and hybridize.score is score and hybridize.train is train
    assert hybridize.load_recipe is load_recipe
    assert hybridize.evaluate is run_eval and hybridize.retention is run_retention
    assert hybridize.bench is run_bench_command and hybridize.push is push_folder
    assert hybridize.HybridConfig is HybridConfig and hybridize.HybridForCausalLM is HybridForCausalLM


def test_subpackages_do_not_hide_the_functions_of_the_same_name():
    code = ("import hybridize.convert.readers, hybridize.train.recipe, hybridize; "
            "print(callable(hybridize.convert), callable(hybridize.train))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_unknown_names_raise_attribute_error():
    try:
        hybridize.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("hybridize.no_such_thing resolved")


def test_import_is_cheap():
    code = "import sys, hybridize, hybridize.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
