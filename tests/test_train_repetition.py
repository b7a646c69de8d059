"""Cutting documents where they start repeating themselves (`max_repetition` on a data source)."""

from __future__ import annotations

import numpy as np
import pytest

import test_train_support as S
from hybridize.train.data import build_corpus
from hybridize.train.recipe import RecipeError, load_recipe
from hybridize.train.repetition import NGRAM, WINDOW, cut_repetition, repetition_cuts

pytestmark = pytest.mark.usefixtures("one_thread")


def _kept_length_by_hand(doc: list[int], threshold: float, n: int, window: int) -> int:
    """The definition, one window at a time: a window of `window` n-grams ending at e is over the threshold when
    more than `threshold` of them began earlier within `window` positions before; cut at the first such window."""
    grams = [tuple(doc[j : j + n]) for j in range(len(doc) - n + 1)]
    repeated = [any(grams[p] == grams[j] for p in range(max(0, j - window), j)) for j in range(len(grams))]
    for e in range(window - 1, len(grams)):
        if sum(repeated[e - window + 1 : e + 1]) / window > threshold:
            return e - window + 1
    return len(doc)


def _corpus(rng, docs: list[list[int]]):
    ids = np.array([t for d in docs for t in d], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return ids, offsets


def _looping(rng, clean: int, loop: int, period: int, vocab: int = 5000) -> list[int]:
    phrase = rng.integers(0, vocab, period).tolist()
    return rng.integers(0, vocab, clean).tolist() + (phrase * (loop // period + 1))[:loop]


@pytest.mark.parametrize("n, window, threshold", [(NGRAM, 16, 0.3), (3, 9, 0.5), (2, 7, 0.2)])
def test_cuts_match_the_definition_window_by_window(n, window, threshold):
    rng = np.random.default_rng(3)
    docs = [_looping(rng, int(rng.integers(0, 60)), int(rng.integers(0, 50)), int(rng.integers(1, 9)), vocab=40)
            for _ in range(25)] + [[], [7], rng.integers(0, 3, 30).tolist()]
    ids, offsets = _corpus(rng, docs)
    kept = repetition_cuts(ids, offsets, threshold, n, window)
    assert kept.tolist() == [_kept_length_by_hand(d, threshold, n, window) for d in docs]


def test_a_loop_is_cut_near_where_it_begins_and_clean_text_is_kept():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 5000, 700).tolist()
    looping = _looping(rng, 400, 600, 23)
    short = _looping(rng, 10, 100, 3)  # shorter than one window: kept whole
    ids, offsets = _corpus(rng, [clean, looping, short])
    new_ids, new_offsets, removed = cut_repetition(ids, offsets, 0.3)
    kept = np.diff(new_offsets)
    assert len(kept) == 3  # documents keep their places (the held-out split is per document)
    assert kept[0] == 700 and kept[2] == len(short)
    assert 400 - WINDOW <= kept[1] <= 400  # the first window that is mostly loop starts before the loop's middle
    assert removed == len(looping) - kept[1] and len(new_ids) == len(ids) - removed
    assert new_ids[new_offsets[1] : new_offsets[2]].tolist() == looping[: kept[1]]
    assert new_ids[new_offsets[2] :].tolist() == short


def test_nothing_to_cut_returns_the_same_arrays():
    rng = np.random.default_rng(1)
    ids, offsets = _corpus(rng, [rng.integers(0, 5000, 300).tolist() for _ in range(3)])
    out_ids, out_offsets, removed = cut_repetition(ids, offsets, 0.3)
    assert removed == 0 and out_ids is ids and out_offsets is offsets


def test_a_source_is_cut_after_its_cache_and_says_how_much(tmp_path, capsys):
    from transformers import AutoTokenizer

    from hybridize.train.plan import note_repetition_cut

    docs = S.write_documents(tmp_path / "docs", count=3)
    (docs / "loop.txt").write_text("A quiet start of a document, then it loops. " + "the bell rang again and " * 200)
    src = S.make_tiny_source(tmp_path / "src", docs, layers=1)
    tok = AutoTokenizer.from_pretrained(src)
    recipe = S.tiny_recipe(src, docs, tmp_path / "out", tmp_path / "cache")
    path = S.write_recipe(tmp_path / "r.yaml", recipe)
    plain = build_corpus(load_recipe(path).data, tok, seed=0)
    recipe["data"]["sources"][0]["max_repetition"] = 0.3
    cut_recipe = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))
    cut = build_corpus(cut_recipe.data, tok, seed=0)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1  # the cache holds every token, read by both
    removed, total = cut.repetition_cut[0]
    assert total == len(plain.train[0].ids) + len(plain.heldout.ids)
    assert removed > 0 and len(cut.train[0].ids) + len(cut.heldout.ids) == total - removed
    assert cut.train[0].num_docs == plain.train[0].num_docs  # the same documents held out
    looped = tok("the bell rang again and " * 200, add_special_tokens=False)["input_ids"]
    assert removed > 0.8 * len(looped)
    notes = note_repetition_cut(cut_recipe, cut, main=True)
    assert len(notes) == 1 and f"{removed:,} of {total:,} tokens" in notes[0] and "data.sources[0]" in notes[0]
    assert notes[0] in capsys.readouterr().out.splitlines()
    assert plain.repetition_cut == [(0, total)]


@pytest.mark.parametrize("value", [0, 1, -0.5, 1.5])
def test_max_repetition_must_be_a_share(tmp_path, value):
    recipe = S.tiny_recipe(tmp_path / "src", tmp_path / "docs", tmp_path / "out", tmp_path / "cache")
    recipe["data"]["sources"][0]["max_repetition"] = value
    with pytest.raises(RecipeError, match=r"r.yaml: data.sources\[0\].max_repetition: must be in \(0, 1\)"):
        load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))
