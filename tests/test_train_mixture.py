"""The retention recipe's parts: built-in teacher prompts, per-stage data mixtures, layers placed by a scoring method
run once and cached, plain-text sources read without `datasets`."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import test_train_support as S
from hybridize.train.data import Corpus, TokenizedDocs, build_corpus
from hybridize.train.models import sparse_layers_for
from hybridize.train.prompts import builtin_prompts
from hybridize.train.recipe import RecipeError, load_recipe
from hybridize.train.plan import training_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _good(tmp_path):
    return S.tiny_recipe(tmp_path / "src", tmp_path / "docs", tmp_path / "out", tmp_path / "cache")


def _docs(first_token: int, count: int, length: int) -> TokenizedDocs:
    ids = np.full(count * length, first_token, dtype=np.int32)
    return TokenizedDocs(ids, np.arange(0, count * length + 1, length, dtype=np.int64))


def test_stage_weights_choose_the_sources_it_reads():
    corpus = Corpus([_docs(5, 40, 64), _docs(7, 40, 64)], [1.0, 1.0], None)
    both = {int(corpus.stream(64, 0)[i][0][0]) for i in range(200)}
    assert both == {5, 7}
    only_second = {int(corpus.stream(64, 0, [0.0, 1.0])[i][0][0]) for i in range(200)}
    assert only_second == {7}


def test_document_reach_is_the_length_half_of_a_stages_tokens_sit_in():
    corpus = Corpus([_docs(5, 40, 10), _docs(7, 1, 1000)], [1.0, 1.0], None)
    assert corpus.document_reach([3.0, 1.0]) == 10  # three quarters of the stream from the short documents
    assert corpus.document_reach([1.0, 3.0]) == 1000
    assert corpus.document_reach([0.0, 1.0]) == 1000
    assert corpus.document_reach([1.0, 0.0]) == 10


def test_stages_longer_than_their_documents_get_a_note(tmp_path, capsys):
    from hybridize.train.plan import note_document_reach

    recipe = load_recipe(S.write_recipe(tmp_path / "r.yaml", _good(tmp_path)))  # stages of 32 and 64 tokens
    short = Corpus([_docs(5, 50, 20)], [1.0], None)  # past half of 64, not of 32
    notes = note_document_reach(recipe, short, main=True)
    assert len(notes) == 1 and "'distil' reads 64-token sequences" in notes[0] and "20 tokens" in notes[0]
    assert capsys.readouterr().out.strip() == notes[0]
    assert note_document_reach(recipe, short, main=False) == notes and capsys.readouterr().out == ""
    assert note_document_reach(recipe, Corpus([_docs(5, 10, 64)], [1.0], None), main=True) == []
    joined = _good(tmp_path)
    joined["stages"][1]["join_documents"] = True  # its documents read each other: nothing to note
    assert note_document_reach(load_recipe(S.write_recipe(tmp_path / "j.yaml", joined)), short, main=False) == []


def test_stage_weights_skip_heldout_sources(tmp_path):
    recipe = _good(tmp_path)
    docs = recipe["data"]["sources"][0]
    recipe["data"]["sources"] = [dict(docs), dict(docs, heldout=True), dict(docs)]
    recipe["stages"][1]["data_weights"] = [0.0, 0.0, 2.0]
    r = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))
    assert training_weights(r, r.stages[1]) == [0.0, 2.0]
    assert training_weights(r, r.stages[0]) is None


@pytest.mark.parametrize("mutate, field, words", [
    (lambda r: r["stages"][0].update(data_weights=[1.0, 1.0]), "stages[0].data_weights", "one weight per data source"),
    (lambda r: r["stages"][0].update(data_weights=[-1.0]), "stages[0].data_weights", "finite and >= 0"),
    (lambda r: r["stages"][0].update(data_weights=[0.0]), "stages[0].data_weights", "no training source"),
    (lambda r: r["model"].update(select="random"), "model.select", "uniform, sala, block_influence"),
    (lambda r: r["model"].update(score_report="x.json"), "model.score_report", "select: sala, block_influence or window"),
    (lambda r: r["data"]["sources"].append({"type": "teacher", "prompts": []}), "data.sources[1].prompts",
     "leave prompts out"),
    (lambda r: r["data"]["sources"].append({"type": "teacher", "batch_size": 0}), "data.sources[1].batch_size",
     "must be positive"),
    (lambda r: r["data"]["sources"].append({"type": "teacher", "unprompted": True, "prompts": ["Once"]}),
     "data.sources[1].unprompted", "drop `prompts`"),
    (lambda r: r["data"]["sources"][0].update(unprompted=True), "data.sources[0].unprompted", "only a teacher source"),
    (lambda r: r["data"]["sources"].append({"type": "teacher", "max_new_tokens": 8, "min_new_tokens": 9}),
     "data.sources[1].min_new_tokens", "more than max_new_tokens"),
    (lambda r: r["data"]["sources"].append({"type": "teacher", "start_token": "<eos>"}),
     "data.sources[1].start_token", "only with unprompted"),
])
def test_new_fields_are_validated(tmp_path, mutate, field, words):
    recipe = _good(tmp_path)
    mutate(recipe)
    with pytest.raises(RecipeError) as e:
        load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))
    assert f"r.yaml: {field}:" in str(e.value) and words in str(e.value)


def test_teacher_source_without_prompts_uses_the_builtin_ones(tmp_path):
    import torch

    _, tok, teacher = S.tiny_teacher(tmp_path)
    recipe = _good(tmp_path)
    recipe["data"] = {"sources": [{"type": "teacher", "num_samples": 5, "max_new_tokens": 4, "batch_size": 2}],
                      "cache_dir": str(tmp_path / "cache")}
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data
    torch.manual_seed(0)
    corpus = build_corpus(spec, tok, seed=0, teacher=teacher, teacher_key="tiny")
    assert corpus.train[0].num_docs == 5
    prompts = builtin_prompts()
    texts = [tok.decode(corpus.train[0].ids[a:b]) for a, b in zip(corpus.train[0].offsets[:-1],
                                                                  corpus.train[0].offsets[1:])]
    assert all(t.startswith(p) for t, p in zip(texts, prompts[:5]))  # byte-level BPE: prompts come back exactly
    assert len(set(prompts)) == len(prompts) > 500


def test_unprompted_teacher_samples_start_from_the_begin_of_text_token_alone(tmp_path):
    import torch

    _, tok, teacher = S.tiny_teacher(tmp_path)
    recipe = _good(tmp_path)
    recipe["data"] = {"sources": [{"type": "teacher", "unprompted": True, "num_samples": 5, "max_new_tokens": 6,
                                   "batch_size": 2}], "cache_dir": str(tmp_path / "cache")}
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data
    first_inputs = []
    teacher.model.embed_tokens.register_forward_hook(
        lambda module, args, out: first_inputs.append(args[0].clone()) if not first_inputs else None)
    torch.manual_seed(0)
    corpus = build_corpus(spec, tok, seed=0, teacher=teacher, teacher_key="tiny")
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert first_inputs[0].tolist() == [[start], [start]]  # one token per sample, once, whatever the tokenizer adds
    assert corpus.train[0].num_docs == 5
    # start_token: another start, a new cache key (nothing of the first corpus is read back)
    recipe["data"]["sources"][0]["start_token"] = "a"
    first_inputs.clear()
    spec = load_recipe(S.write_recipe(tmp_path / "s.yaml", recipe)).data
    build_corpus(spec, tok, seed=0, teacher=teacher, teacher_key="tiny")
    assert first_inputs[0].tolist() == [[tok.convert_tokens_to_ids("a")]] * 2
    recipe["data"]["sources"][0]["start_token"] = "<|nothing|>"
    with pytest.raises(ValueError, match=re.escape("start_token: the tokenizer has no token '<|nothing|>'")):
        build_corpus(load_recipe(S.write_recipe(tmp_path / "t.yaml", recipe)).data, tok, seed=0, teacher=teacher,
                     teacher_key="tiny")


def test_min_new_tokens_holds_off_the_end_of_text(tmp_path):
    import torch

    from hybridize.train.data import _sample

    _, tok, teacher = S.tiny_teacher(tmp_path)
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 30.0  # a teacher whose first choice is always to end the text, unless held off
    teacher.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    recipe = _good(tmp_path)
    recipe["data"]["sources"] = [{"type": "teacher", "unprompted": True, "max_new_tokens": 7, "temperature": 1.0},
                                 {"type": "teacher", "unprompted": True, "max_new_tokens": 7, "min_new_tokens": 7,
                                  "temperature": 1.0}]
    free, held = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data.sources
    start = [tok.bos_token or tok.eos_token] * 6
    torch.manual_seed(0)
    ended = _sample(teacher, tok, start, free, "cpu")[:, 1:]
    kept = _sample(teacher, tok, start, held, "cpu")[:, 1:]
    assert (ended[:, 0] == tok.eos_token_id).all()  # the control: this teacher does end at once
    assert kept.shape == (6, 7) and not (kept == tok.eos_token_id).any()


def test_later_fields_leave_the_cache_keys_of_earlier_sources_unchanged(tmp_path):
    from types import SimpleNamespace

    from hybridize.train.data import source_fingerprint

    _, tok, _ = S.tiny_teacher(tmp_path)
    recipe = _good(tmp_path)
    recipe["data"]["sources"] = [{"type": "teacher", "num_samples": 3}, {"type": "teacher", "num_samples": 3,
                                                                          "unprompted": True}]
    prompted, unprompted = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data.sources
    before = SimpleNamespace(**{k: v for k, v in vars(prompted).items() if k not in ("unprompted", "min_new_tokens")})
    assert source_fingerprint(prompted, tok, True) == source_fingerprint(before, tok, True)
    assert source_fingerprint(unprompted, tok, True) != source_fingerprint(prompted, tok, True)


def test_text_source_names_a_file_that_is_not_its_encoding(tmp_path):
    from transformers import AutoTokenizer

    docs = S.write_documents(tmp_path / "docs", count=2)
    src = S.make_tiny_source(tmp_path / "src", docs, layers=1)
    (docs / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 10)
    recipe = _good(tmp_path)
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).data
    with pytest.raises(ValueError, match=r"bad.txt is not valid utf-8 .*encoding"):
        build_corpus(spec, AutoTokenizer.from_pretrained(src), seed=0)


def test_select_scores_once_and_reads_the_cache(tmp_path):
    _, tok, model = S.tiny_teacher(tmp_path, layers=6)
    recipe = _good(tmp_path)
    recipe["model"].update(select="block_influence", ratio="1:2")
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).model
    said: list[str] = []
    first = sparse_layers_for(model, spec, tokenizer=tok, cache_dir=str(tmp_path / "cache"), progress=False,
                              log=said.append)
    assert len(first) == 2 and all(0 <= i < 6 for i in first)
    assert said[-1].startswith("scoring layers (block_influence) once")
    reports = list((tmp_path / "cache" / "scores").glob("block_influence-*.json"))
    assert len(reports) == 1
    again = sparse_layers_for(model, spec, tokenizer=None, cache_dir=str(tmp_path / "cache"), progress=False,
                              log=said.append)
    assert again == first and said[-1] == f"layer scores (block_influence): {reports[0]}"  # read, not scored again
    spec.layers = [1, 4]  # an explicit list wins over any method
    assert sparse_layers_for(model, spec, tokenizer=tok, cache_dir=str(tmp_path / "cache")) == [1, 4]


def test_unset_select_places_layers_as_convert_does(tmp_path):
    """No model.select: a small source with a tokenizer is placed by block influence (convert's default, the measured
    better placement), one without a tokenizer (nothing to score on) uniformly."""
    from hybridize.select.placement import uniform_layers

    _, tok, model = S.tiny_teacher(tmp_path, layers=6)
    recipe = _good(tmp_path)
    recipe["model"].pop("select", None)
    recipe["model"].update(ratio="1:2")
    spec = load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)).model
    assert spec.select is None
    said: list[str] = []
    chosen = sparse_layers_for(model, spec, tokenizer=tok, cache_dir=str(tmp_path / "cache"), progress=False,
                               log=said.append)
    assert len(chosen) == 2 and said and said[-1].startswith("scoring layers (block_influence) once")
    assert list((tmp_path / "cache" / "scores").glob("block_influence-*.json"))
    plain = sparse_layers_for(model, spec, tokenizer=None, cache_dir=str(tmp_path / "other"), progress=False,
                              log=said.append)
    assert plain == uniform_layers(6, 2) and not (tmp_path / "other").exists()


def test_converted_student_loads_with_the_installed_classes_only(tmp_path):
    """A converted folder's own modeling file is never run (it could come from anywhere)."""
    from click.testing import CliRunner

    from hybridize.cli import main
    from hybridize.train.models import load_models

    docs = S.write_documents(tmp_path / "docs", count=2)
    src = S.make_tiny_source(tmp_path / "src", docs, layers=2)
    hybrid = tmp_path / "hybrid"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(hybrid), "--ratio", "1:1", "--no-sample", "-q"])
    assert res.exit_code == 0, res.output
    marker = tmp_path / "ran"
    code = hybrid / "modeling_hybridize.py"
    code.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + code.read_text())
    recipe = _good(tmp_path)
    recipe["model"] = {"source": str(src), "converted": str(hybrid)}
    student, _, _, _ = load_models(load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)), need_teacher=False)
    assert type(student).__module__.startswith("hybridize.arch") and not marker.exists()
    recipe["model"]["converted"] = str(src)  # a dense folder is no converted hybrid
    with pytest.raises(ValueError, match="not a hybrid"):
        load_models(load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe)), need_teacher=False)


def test_weights_key_follows_the_weights_not_their_dtype():
    import torch

    from helpers import tiny_llama
    from hybridize.select.cache import weights_key

    model = tiny_llama(layers=2, seed=4)
    with torch.no_grad():  # weights that bfloat16 holds exactly, as a bf16 checkpoint read into float32 does
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    key = weights_key(model)
    assert weights_key(model.to(torch.bfloat16)) == key
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1.0
    assert weights_key(model) != key


def test_recall_copies_a_span_of_the_same_document_over_its_end():
    from hybridize.train.data import RecallStream

    corpus = Corpus([TokenizedDocs(np.arange(1000, dtype=np.int32), np.array([0, 100, 1000]))], [1.0], None)
    plain = corpus.stream(256, 0)
    every = RecallStream(plain, 1.0, 16, seed=3)
    changed = 0
    for i in range(20):
        (tokens, starts), (out, same_starts) = plain[i], every[i]
        assert np.array_equal(starts, same_starts)
        a = int(starts[-1])
        if len(tokens) - a < 64:  # last document too short for a copy: untouched
            assert np.array_equal(out, tokens)
            continue
        changed += 1
        assert np.array_equal(out[:-16], tokens[:-16])
        src = int(out[-16]) - int(tokens[0])  # the token ids are positions in the corpus: where the copy came from
        assert np.array_equal(out[-16:], tokens[src : src + 16]) and a <= src <= a + (len(tokens) - a - 16) // 2
        assert np.array_equal(every[i][0], out)  # pure in i
    assert changed > 0
    never = RecallStream(plain, 0.0, 16, seed=3)
    assert all(np.array_equal(never[i][0], plain[i][0]) for i in range(5))


def test_a_recall_cue_leaves_the_copys_first_tokens_without_a_target():
    """The same copies as without a cue; only the targets that predict the copy's first `cue` tokens are gone, and
    the cross-entropy of a real model over the batch is its sum without those positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.train.data import RecallStream, make_batch
    from hybridize.train.losses import cross_entropy_sum

    corpus = Corpus([TokenizedDocs(np.arange(1000, dtype=np.int32) % 97, np.array([0, 100, 1000]))], [1.0], None)
    plain = corpus.stream(256, 0)
    bare, cued = RecallStream(plain, 1.0, 16, seed=3), RecallStream(plain, 1.0, 16, seed=3, cue=5)
    copied = [i for i in range(20) if len(cued[i]) == 3]
    assert copied and all(len(cued[i]) == 2 for i in range(20) if i not in copied)  # no copy: nothing unscored
    i = copied[0]
    assert np.array_equal(bare[i][0], cued[i][0])
    with_cue, without = make_batch([cued[i], plain[i + 1]]), make_batch([bare[i], plain[i + 1]])
    gone = (with_cue["targets"] != without["targets"])[0].nonzero().flatten().tolist()
    assert gone == list(range(256 - 16 - 1, 256 - 16 - 1 + 5))  # the targets that are the copy's tokens 0-4
    assert (with_cue["targets"][0, gone] == -100).all() and with_cue["counted"] == without["counted"] - 5
    assert torch.equal(with_cue["input_ids"], without["input_ids"]) and with_cue["rows"] == 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with torch.no_grad():
        logits = model(input_ids=without["input_ids"].view(2, -1)).logits.reshape(1, 512, -1)
        full, n_full = cross_entropy_sum(logits, without["targets"])
        cut, n_cut = cross_entropy_sum(logits, with_cue["targets"])
        lost = torch.nn.functional.cross_entropy(logits[0, gone], without["targets"][0, gone], reduction="sum")
    assert int(n_full) - int(n_cut) == 5
    torch.testing.assert_close(cut, full - lost, rtol=1e-5, atol=1e-4)


def test_recall_span_must_fit_the_stage(tmp_path):
    recipe = _good(tmp_path)
    recipe["stages"][0].update(recall=0.5, recall_span=16)  # seq_len 32 holds no 4 spans of 16
    with pytest.raises(RecipeError, match=r"stages\[0\].recall_span: a recall copy needs"):
        load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))
    recipe["stages"][0].update(recall=1.5, recall_span=4)
    with pytest.raises(RecipeError, match=r"stages\[0\].recall:"):
        load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))
    recipe["stages"][0].update(recall=0.5, recall_span=4, recall_min_gap=28)  # 4 + 28 fill the whole seq_len 32
    with pytest.raises(RecipeError, match=r"stages\[0\].recall_min_gap: a copy 28 tokens after"):
        load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))
    recipe["stages"][0].update(recall=0.5, recall_span=4, recall_min_gap=0, recall_cue=4)
    with pytest.raises(RecipeError, match=r"stages\[0\].recall_cue: 4 unscored tokens leave nothing"):
        load_recipe(S.write_recipe(tmp_path / "r.yaml", recipe))


def test_a_stage_with_joined_documents_trains_and_exports(tmp_path):
    """A distillation stage whose documents read each other runs end to end (teacher and student on the rows, no
    cu_seqlens), with far recall copies, and logs finite losses."""
    import json

    from click.testing import CliRunner

    from hybridize.cli import main

    docs = S.write_documents(tmp_path / "docs", count=4, chars=600)  # documents shorter than the sequences
    src = S.make_tiny_source(tmp_path / "src", docs, layers=2)
    stage = {"name": "distil", "seq_len": 64, "global_batch_tokens": 256, "micro_batch_size": 2, "steps": 2,
             "lr": 1e-3, "schedule": "constant", "trainable": "all", "join_documents": True,
             "document_separator": "a", "loss": {"kl": 1.0, "ce": 0.5},
             "recall": 1.0, "recall_span": 8, "recall_min_gap": 32,  # copies from any earlier document of the row
             "recall_cue": 3}
    recipe = S.tiny_recipe(src / "model.safetensors", docs, tmp_path / "out", tmp_path / "cache", stages=[stage])
    recipe["data"]["heldout_fraction"] = 0.0
    result = CliRunner().invoke(main, ["train", str(S.write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    assert "attention never crosses" not in result.output
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_document_separator_is_checked_against_the_recipe_and_the_tokenizer(tmp_path):
    from click.testing import CliRunner

    from hybridize.cli import main

    recipe = _good(tmp_path)
    recipe["stages"][1]["document_separator"] = "<s>"
    with pytest.raises(RecipeError, match=r"stages\[1\].document_separator: only with join_documents"):
        load_recipe(S.write_recipe(tmp_path / "a.yaml", recipe))
    recipe["stages"][1]["join_documents"] = True
    recipe["data"]["append_eos"] = False
    with pytest.raises(RecipeError, match=r"stages\[1\].document_separator: replaces the end-of-text token"):
        load_recipe(S.write_recipe(tmp_path / "b.yaml", recipe))
    docs = S.write_documents(tmp_path / "docs", count=3, chars=600)
    src = S.make_tiny_source(tmp_path / "src", docs, layers=2)
    stage = {"name": "distil", "seq_len": 64, "global_batch_tokens": 128, "micro_batch_size": 2, "steps": 1,
             "lr": 1e-3, "trainable": "all", "join_documents": True, "document_separator": "<|nothing|>",
             "loss": {"ce": 1.0}}
    tiny = S.tiny_recipe(src / "model.safetensors", docs, tmp_path / "out", tmp_path / "cache", stages=[stage])
    result = CliRunner().invoke(main, ["train", str(S.write_recipe(tmp_path / "c.yaml", tiny))])
    assert result.exit_code == 2, result.output
    assert "stages[0].document_separator: the tokenizer has no token '<|nothing|>'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "model").exists()
    # a source's start_token is checked at the same point, before the teacher samples anything
    stage["document_separator"] = "a"
    tiny["stages"] = [stage]
    tiny["data"]["sources"].append({"type": "teacher", "unprompted": True, "start_token": "<|none|>"})
    result = CliRunner().invoke(main, ["train", str(S.write_recipe(tmp_path / "d.yaml", tiny))])
    assert result.exit_code == 2, result.output
    assert "data.sources[1].start_token: the tokenizer has no token '<|none|>'" in result.output


def test_recall_with_a_minimum_gap_copies_from_beyond_it_and_joined_rows_use_every_document():
    from hybridize.train.data import RecallStream

    corpus = Corpus([TokenizedDocs(np.arange(3000, dtype=np.int32), np.array([0, 100, 350, 3000]))], [1.0], None)
    plain = corpus.stream(256, 0)
    for joined in (False, True):
        far = RecallStream(plain, 1.0, 16, seed=5, min_gap=150, joined=joined)
        gaps, changed = [], 0
        for i in range(40):
            (tokens, starts), (out, _) = plain[i], far[i]
            a = 0 if joined else int(starts[-1])
            if len(tokens) - 16 - 150 < a:  # no span that far back: untouched
                assert np.array_equal(out, tokens)
                continue
            changed += 1
            src = int(out[-16]) - int(tokens[0])
            assert np.array_equal(out[-16:], tokens[src: src + 16]) and np.array_equal(out[:-16], tokens[:-16])
            assert a <= src and len(tokens) - 16 - src >= 150
            gaps.append(len(tokens) - 16 - src)
        assert changed > 0 and max(gaps) > 150
        if joined:  # spans before the last document's start occur
            assert any(int(far[i][0][-16]) - int(plain[i][0][0]) < int(plain[i][1][-1]) for i in range(40))
