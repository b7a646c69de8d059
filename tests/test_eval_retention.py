"""The retention report: held-out sources, multi-needle retrieval, agreement, knowledge probes, report and CLI."""

import importlib.util
import json
import random
import re

import pytest
import torch
from click.testing import CliRunner

from eval_tools import CopyConfig, CopyModel, save_source_and_hybrid, word_tokenizer
from helpers import TINY_SPARSE, tiny_llama
from hybridize.arch.configuration_hybridize import default_layer_types
from hybridize.cli import main
from hybridize.convert.build import build_hybrid
from hybridize.eval.heldout import check_disjoint, clean_wiki, ngram_overlap, read_documents, stage_data
from hybridize.eval.loading import LoadedModel
from hybridize.eval.perplexity import perplexity_of_ids, position_edges, position_nll
from hybridize.eval.probes import PROBES
from hybridize.eval.report import retention_markdown
from hybridize.eval.retention import (
    RetentionSettings, merge_reports, next_token_agreement, probe_correct, probe_echo, retention_report,
    run_lm_eval, score_probes, write_retention_report,
)
from hybridize.eval.retrieval import TASKS, make_probe, run_retrieval

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only contends
LENGTHS = (160, 256)


def _count(seq: list[int], sub: list[int]) -> int:
    return sum(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_copy_model_scores_one_on_every_retrieval_task():
    tok = word_tokenizer()
    model = CopyModel(CopyConfig(vocab_size=len(tok)))
    for task in TASKS:
        r = run_retrieval(model, tok, task, LENGTHS, depths=(0.0, 0.5, 1.0), chunk_size=64)
        assert r.accuracy == 1.0 and r.choice_accuracy == 1.0, task
        assert r.task == task and len(r.probes) == 6


def test_random_models_score_near_chance_on_multi_needle_tasks():
    tok = word_tokenizer()
    dense = tiny_llama(vocab=len(tok), seed=1)
    hybrid = build_hybrid(tiny_llama(vocab=len(tok), seed=2), default_layer_types(4))
    hybrid.config.update(TINY_SPARSE)
    for model in (dense, hybrid):
        for task in ("multikey", "kv"):
            r = run_retrieval(model, tok, task, LENGTHS, depths=(0.25, 0.75), trials=3, seed=5, chunk_size=100)
            assert r.chance == 0.1 and len(r.probes) == 12
            assert r.accuracy <= 0.05, (task, r.accuracy)  # exact multi-token answers
            assert r.choice_accuracy <= 0.5, (task, r.choice_accuracy)  # 1 of 10 (12 probes): chance 0.1


@pytest.mark.parametrize("task", ["multikey", "kv"])
def test_multi_needle_probes_have_the_exact_length_and_the_asked_needle_once(task):
    tok = word_tokenizer()
    for length, depth, seed in ((160, 0.0, 0), (200, 0.5, 1), (300, 1.0, 2)):
        probe = make_probe(task, tok, length, depth, random.Random(seed), needles=4)
        assert len(probe.prompt) == length
        assert tok.unk_token_id not in probe.prompt
        answer = probe.candidates[0]
        assert tok.decode(answer).replace(" ", "") == probe.answer
        assert _count(probe.prompt, answer) == 1  # the asked needle's answer, once (the question does not give it)
        for other in probe.candidates[1:4]:  # the other needles' answers are the first distractors
            assert _count(probe.prompt, other) == 1
        assert len(probe.candidates) == 10 and len({tuple(c) for c in probe.candidates}) == 10
    with pytest.raises(ValueError, match="too short"):
        make_probe(task, tok, 40, 0.5, random.Random(0))


def test_heldout_sources_load_as_clean_english():
    for source in ("news", "wiki", "pydoc"):
        docs = read_documents(source)
        assert len(docs) >= 50 and all(d.strip() for d in docs), source
        words = " ".join(docs).lower().split()
        common = sum(w in {"the", "of", "and", "to", "a", "in", "is"} for w in words) / len(words)
        assert common > 0.1, (source, common)  # English prose
    wiki = "\n".join(read_documents("wiki"))
    for markup in ("{{", "[[", "<ref", "'''", "]]", "}}"):
        assert markup not in wiki, markup
    assert "Anarchism is a political philosophy" in wiki


def test_staged_data_folder_replaces_the_packages(tmp_path, monkeypatch):
    folder = stage_data(tmp_path / "data")
    news = read_documents("news")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # as on a machine without the packages
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim"):
        read_documents("news")
    assert read_documents("news", data_dir=folder) == news
    assert len(read_documents("wiki", data_dir=folder)) > 50
    assert len(read_documents("shakespeare", data_dir=folder)) > 30
    with pytest.raises(FileNotFoundError, match="lee_background.cor"):
        read_documents("news", data_dir=tmp_path)


def test_clean_wiki_strips_nested_markup():
    markup = ("{{Infobox|name={{nested|x}}}}'''Bold''' is a [[political philosophy|philosophy]] of [[Europe]].<ref "
              "name=a>cite {{cite|y}}</ref><ref name=b/> [[File:X.jpg|thumb|A [[caption]] link]]\n"
              "== History ==\n{| class=wikitable\n|-\n| cell\n|}\nSee [http://example.org the site].<!-- note -->"
              "[[Category:Things]][[de:Ding]]")
    assert clean_wiki(markup) == "Bold is a philosophy of Europe.\nHistory\nSee the site."


def test_heldout_sources_are_disjoint_from_the_shakespeare_training_text():
    train = read_documents("shakespeare")
    heldout = {s: read_documents(s) for s in ("news", "wiki", "pydoc")}
    overlap = check_disjoint(train, heldout, max_ngrams=3000)
    assert set(overlap) == {"news", "wiki", "pydoc"} and all(v < 0.001 for v in overlap.values()), overlap
    assert ngram_overlap(train, train[:3], max_ngrams=3000) == 1.0
    with pytest.raises(ValueError, match="'plays'"):
        check_disjoint(train, {"news": heldout["news"], "plays": train[5:6]}, max_ngrams=500)


def test_position_nll_averages_to_the_perplexity(seed):
    model = tiny_llama()
    ids = torch.randint(3, 97, (300,))
    r = position_nll(model, ids, 128, position_edges(128, 16), chunk_size=50)
    assert r.edges == [0, 16, 32, 64, 128] and r.tokens == [32, 32, 64, 126] and r.windows == 2
    mean = sum(n * c for n, c in zip(r.nll, r.tokens)) / sum(r.tokens)
    assert abs(mean - perplexity_of_ids(model, ids, 128).nll) < 1e-5


def test_agreement_of_a_model_with_itself_is_one_and_kl_zero(seed):
    model, other = tiny_llama(seed=1), tiny_llama(seed=2)
    ids = torch.randint(3, 97, (200,))
    got = next_token_agreement(model, {"self": model, "other": other}, ids, 64, chunk_size=40)
    assert got["self"] == {"top1": 1.0, "kl": pytest.approx(0.0, abs=1e-5), "tokens": 192}
    assert got["other"]["top1"] < 0.5 and got["other"]["kl"] > 0.1


def test_probe_scoring_counts_hand_made_completions():
    assert probe_correct(" Paris, the city of light", ["Paris"])
    assert probe_correct(' "paris".', ["Paris"])
    assert probe_correct("metres.", ["meters", "metres"])
    assert not probe_correct(" Parisian", ["Paris"])
    assert not probe_correct(" 10", ["1"])
    assert not probe_correct(" Lyon", ["Paris"])
    probes = [("c", "The capital of France is", ("Paris",)), ("c", "2 + 2 =", ("4",)), ("c", "Snow is", ("white",))]
    ref = score_probes([" Paris.", " 4", " cold"], probes)
    assert (ref["correct"], ref["total"]) == (2, 3)
    model = score_probes([" Paris", " 5", " white"], probes, reference_correct=[True, True, False])
    assert (model["correct"], model["retained_correct"], model["retained_total"]) == (2, 1, 2)
    assert model["retained_accuracy"] == 0.5 and [i["correct"] for i in model["items"]] == [True, False, True]


def test_an_answer_that_repeats_its_prompt_is_told_from_one_that_answers():
    assert probe_echo("The opposite of up is", " the opposite of up.\n")
    assert probe_echo("The chemical symbol for gold is", " gold.\n\nThe answer")
    assert not probe_echo("The chemical symbol for gold is", " Au.\n\nThe gold")  # the prompt's word comes later
    assert not probe_echo("The capital of France is", " Paris, France.")
    assert not probe_echo("The opposite of up is", " the")  # function words alone are no content
    probes = [("o", "The opposite of up is", ("down",)), ("o", "The opposite of big is", ("small",))]
    scored = score_probes([" the opposite of up.", " small."], probes)
    assert scored["echoed"] == 1 and [i["echo"] for i in scored["items"]] == [True, False]


def test_the_probe_set_is_well_formed():
    assert 60 <= len(PROBES) <= 120
    assert len({p[1] for p in PROBES}) == len(PROBES)
    assert all(p[2] and all(a.strip() == a and a for a in p[2]) for p in PROBES)


def test_retention_report_measures_and_writes_the_files(tmp_path):
    tok = word_tokenizer()
    models = {"source": LoadedModel("source", tiny_llama(vocab=len(tok)), tok, "dense"),
              "copy": LoadedModel("copy", CopyModel(CopyConfig(vocab_size=len(tok))), tok, "dense")}
    results = retention_report(models, RetentionSettings.quick(), reference="source")
    json.dumps(results)  # JSON-serialisable as it is
    src, copy = results["models"]["source"], results["models"]["copy"]
    assert src["perplexity"]["news"]["64"]["ratio"] == 1.0 and copy["perplexity"]["news"]["64"]["ratio"] > 1.0
    assert all(copy["retrieval"][t]["accuracy"] == 1.0 for t in TASKS)
    assert copy["retrieval"]["kv"]["by_length"]["256"]["n"] == 1
    assert "agreement" not in src and 0.0 <= copy["agreement"]["news"]["top1"] < 1.0
    assert src["probes"]["total"] == len(PROBES) and src["position"]["news"]["tokens"][-1] == 63
    assert models["source"].model.config._attn_implementation == "sdpa"  # restored after the chunked SDPA
    paths = write_retention_report(results, tmp_path / "r")
    assert json.loads(paths["json"].read_text())["reference"] == "source"
    md = paths["markdown"].read_text()
    assert "| held-out perplexity / reference (geometric mean) | 1 |" in md
    for title in ("### Perplexity", "### Retrieval", "### Knowledge probes", "### Agreement with source",
                  "### NLL by position"):
        assert title in md
    assert re.search(r"\| kv \| 256 \| 1 \| 0\.00 / 0\.00 \| 1\.00 / 1\.00 \|", md)
    # where greedy decoding leaves the answer: the random source misses every probe, some at the first token
    probes = src["retrieval"]["passkey"]["probes"]
    first = sum(p["first_miss"] == 0 for p in probes)
    assert all(p["first_miss"] >= 0 for p in probes) and all(p["first_miss"] == -1
                                                              for p in copy["retrieval"]["passkey"]["probes"])
    misses = md[md.index("Greedy misses that fail at the answer's first token"):].split("###")[0]
    assert f"| passkey | {first} of {len(probes)} | 0 of 0 |" in misses
    echoes = [str(m["probes"]["echoed"]) for m in (src, copy)]
    assert "| knowledge probes: answers that repeat the prompt instead |" in md
    assert f"| answers that repeat the prompt instead (first content word from the prompt) | {' | '.join(echoes)} |" in md
    for name in ("retention_retrieval.png", "retention_position.png"):
        assert (tmp_path / "r" / name).read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="reference"):
        retention_report(models, RetentionSettings.quick(), reference="nope")


def test_reports_measured_apart_merge_into_the_report_measured_together():
    tok = word_tokenizer()
    models = {"source": LoadedModel("source", tiny_llama(vocab=len(tok), seed=1), tok, "dense"),
              "other": LoadedModel("other", tiny_llama(vocab=len(tok), seed=2), tok, "dense"),
              "copy": LoadedModel("copy", CopyModel(CopyConfig(vocab_size=len(tok))), tok, "dense")}
    settings = RetentionSettings.quick()
    together = retention_report(models, settings, reference="source")
    first = retention_report({k: models[k] for k in ("source", "other")}, settings, reference="source")
    alone = retention_report({"copy": models["copy"]}, RetentionSettings.quick(trials=2), reference="copy")
    merged = merge_reports([first, alone], reference="source")
    assert list(merged["models"]) == ["source", "other", "copy"]
    for name in ("other", "copy"):
        got, want = merged["models"][name], together["models"][name]
        assert got["summary"]["heldout_ppl_ratio"] == pytest.approx(want["summary"]["heldout_ppl_ratio"], rel=1e-5)
        assert got["probes"]["retained_total"] == want["probes"]["retained_total"]
        assert got["probes"]["retained_correct"] == want["probes"]["retained_correct"]
    # the copy model was measured beside itself: its agreement with the source is not known, the other's is kept
    assert "agreement" not in merged["models"]["copy"] and "agreement" in merged["models"]["other"]
    assert merged["models"]["copy"]["retrieval"]["kv"]["by_length"]["256"]["n"] == 2
    md = retention_markdown(merged)
    assert "1.00 / 1.00 (n=2)" in md
    # the totals over lengths count the probes of every length cell
    kv = merged["models"]["copy"]["retrieval"]["kv"]["by_length"].values()
    n, k = sum(c["n"] for c in kv), sum(round(c["accuracy"] * c["n"]) for c in kv)
    totals = md[md.index("Exact matches over all lengths"):].split("###")[0]
    row = next(line for line in totals.splitlines() if line.startswith("| kv |"))
    assert f"{k}/{n} (" in row
    with pytest.raises(ValueError, match="windows"):
        merge_reports([first, retention_report({"copy": models["copy"]}, RetentionSettings.quick(windows=(32,)),
                                               reference="copy")], reference="source")
    with pytest.raises(ValueError, match="reference"):
        merge_reports([alone], reference="source")
    # the source measured once: a later report takes its measurements and still measures agreement beside it
    reused = retention_report({k: models[k] for k in ("source", "copy")}, settings, reference="source",
                              measured=json.loads(json.dumps(first)))
    source = reused["models"]["source"]
    assert source["reused"] and source["seconds"] == first["models"]["source"]["seconds"]
    got, want = reused["models"]["copy"], together["models"]["copy"]
    assert got["agreement"]["news"]["top1"] == pytest.approx(want["agreement"]["news"]["top1"])
    assert got["summary"]["heldout_ppl_ratio"] == pytest.approx(want["summary"]["heldout_ppl_ratio"], rel=1e-5)
    both = merge_reports([first, reused], reference="source")
    assert list(both["models"]) == ["source", "other", "copy"] and "reused" not in both["models"]["source"]
    with pytest.raises(ValueError, match="more than one"):
        merge_reports([first, first], reference="source")
    with pytest.raises(ValueError, match="max_tokens"):
        retention_report(models, RetentionSettings.quick(max_tokens=1024), reference="source", measured=first)


def test_lm_eval_hook_skips_with_a_note_without_lm_eval():
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed")
    tok = word_tokenizer()
    loaded = LoadedModel("m", tiny_llama(vocab=len(tok)), tok, "dense")
    assert "not installed" in run_lm_eval(loaded, ["hellaswag"])["skipped"]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="task"):
        RetentionSettings(tasks=("passkey", "needle"))
    with pytest.raises(ValueError, match="depths"):
        RetentionSettings(depths=(0.5, 1.5))
    with pytest.raises(ValueError, match="trials"):
        RetentionSettings.quick(trials=0)
    assert RetentionSettings(lengths=[1024]).lengths == (1024,)


def test_cli_reuses_the_reference_measured_by_an_earlier_report(tmp_path):
    save_source_and_hybrid(tmp_path)
    common = ["--compare", str(tmp_path / "source"), "--suite", "retention", "--quick", "--sources", "news",
              "--tasks", "passkey", "--lengths", "160"]
    first = CliRunner().invoke(main, ["eval", str(tmp_path / "hybrid"), *common, "-o", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    earlier = tmp_path / "a" / "retention.json"
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "hybrid"), *common, "--reuse-reference", str(earlier),
                                    "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / d / "retention.json").read_text())["models"] for d in ("a", "b"))
    assert b["source"]["reused"] and b["source"]["perplexity"] == a["source"]["perplexity"]
    assert b["source"]["seconds"] == a["source"]["seconds"]  # taken, not measured again
    assert b["hybrid"]["agreement"]["news"]["top1"] == pytest.approx(a["hybrid"]["agreement"]["news"]["top1"])
    assert b["hybrid"]["summary"]["heldout_ppl_ratio"] == pytest.approx(a["hybrid"]["summary"]["heldout_ppl_ratio"])
    for extra, words in ((["--windows", "48"], "windows"), ([], "not a retention.json")):
        bad = earlier if extra else tmp_path / "a" / "retention.md"
        res = CliRunner().invoke(main, ["eval", str(tmp_path / "hybrid"), *common, *extra, "--reuse-reference",
                                        str(bad), "-o", str(tmp_path / "c")])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "c").exists()
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "hybrid"), "--compare", str(tmp_path / "source"),
                                    "--reuse-reference", str(earlier), "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--suite retention" in res.output


def test_cli_retention_suite_end_to_end(tmp_path):
    save_source_and_hybrid(tmp_path)
    out = tmp_path / "ret"
    args = ["eval", str(tmp_path / "hybrid"), "--compare", str(tmp_path / "source"), "--suite", "retention", "--quick",
            "--sources", "news,pydoc", "--tasks", "passkey,kv", "--lengths", "160", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "retention.json").read_text())
    assert data["reference"] == "source" and list(data["models"]) == ["hybrid", "source"]
    assert list(data["models"]["hybrid"]["perplexity"]) == ["news", "pydoc"]
    assert list(data["models"]["hybrid"]["retrieval"]) == ["passkey", "kv"]
    assert (out / "retention.md").is_file() and (out / "retention_retrieval.png").read_bytes()[:8] == PNG
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "hybrid"), "--suite", "retention",
                                    "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--compare" in res.output and not (tmp_path / "x").exists()


def test_reference_measurements_take_only_the_reference(tmp_path):
    """A model measured in the earlier report under the same name as one given now (a conversion made another way) is
    measured again: only the reference is reused. A file that is not a report, or one made against another reference,
    is refused with a line that names it."""
    from hybridize.eval.retention import reference_measurements

    earlier = {"reference": "source", "settings": {"trials": 2},
               "models": {"source": {"summary": {"probe_accuracy": 0.5}}, "converted": {"summary": {}}}}
    path = tmp_path / "retention.json"
    path.write_text(json.dumps(earlier))
    got = reference_measurements(path, "source")
    assert got["settings"] == {"trials": 2} and list(got["models"]) == ["source"]
    with pytest.raises(ValueError, match="measured the reference 'source', not 'teacher'"):
        reference_measurements(path, "teacher")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json: not a retention.json"):
        reference_measurements(tmp_path / "bad.json", "source")


def test_wilson_interval_covers_the_rate_and_has_the_textbook_edges():
    import numpy as np

    from hybridize.eval.report import wilson_interval

    z2 = 1.96 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # no successes: 0 to z^2 / (n + z^2)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    lo, hi = wilson_interval(21, 42)
    assert lo < 0.5 < hi and 0.5 - lo == pytest.approx(hi - 0.5)
    rng = np.random.default_rng(0)
    for p, n in ((0.3, 40), (0.9, 12)):
        draws = rng.binomial(n, p, 4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in draws)])
        assert 0.92 < covered < 0.99, (p, n, covered)
