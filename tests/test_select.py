"""Layer selection (issue 4) on a tiny random Llama with a real (small, trained) BPE tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from helpers import tiny_llama
from hybridize.arch.modeling_hybridize import AttentionContext
from hybridize.cli import main
from hybridize.select.alignment import AlignSettings, load_student_tensors
from hybridize.select.api import ScoreSettings, heldout_loss, hybrid_with_students, score_model, write_result
from hybridize.select.data import read_text_files, shakespeare_files
from hybridize.select.placement import num_sparse_layers, uniform_layers
from hybridize.select.probes import ProbeSettings
from hybridize.select.registry import SELECTORS, get_selector

LAYERS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = read_text_files(shakespeare_files()[:2], 200_000)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(layers=LAYERS, vocab=len(tokenizer), seed=3)


def tiny_settings(**overrides) -> ScoreSettings:
    base = ScoreSettings(
        seq_len=64, align=AlignSettings(steps=6, batch_size=2), heldout_seqs=2, heldout_seq_len=64, compare_seqs=2,
        probes=ProbeSettings(passkey_lengths=(200,), kv_lengths=(200,), samples_per_length=2, kv_queries=2),
        seed=11,
    )
    for k, v in overrides.items():
        setattr(base, k, v)
    return base


@pytest.fixture(scope="module")
def result(model, tokenizer):
    return score_model(model, tokenizer, tiny_settings(compare_uniform=True), progress=False)


@pytest.fixture(scope="module")
def written(result, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "report"
    write_result(result, out)
    return out


def expected_scores(C, R):
    """SALA's formula, written out again here."""
    best_c, best_r = max(C), max(R)
    return [min(50.0, (best_r - r) / (best_c - c + 1e-10)) for c, r in zip(C, R)]


def test_report_has_one_entry_per_layer(result):
    rep = result.report
    assert rep["num_layers"] == LAYERS
    assert [e["layer"] for e in rep["layers"]] == list(range(LAYERS))
    for e in rep["layers"]:
        assert isinstance(e["C"], float) and isinstance(e["R"], float) and 0.0 <= e["R"] <= 1.0
        assert e["C"] == pytest.approx(-e["loss"])
        assert set(e["retrieval"]) == {"passkey@200", "kv@200"}
    assert rep["seed"] == 11 and rep["settings"]["seed"] == 11
    assert rep["wall_time_s"] > 0 and rep["timings"]["sweep_s"] > 0
    # the least-squares output scale leaves every student no worse than predicting zeros on the first batch
    assert all(e["align_initial_relative_error"] <= 1.0 + 1e-4 for e in rep["layers"])
    assert all(e["align_output_scale"] != 1.0 for e in rep["layers"])
    # alignment reduced the students' error on average
    init = sum(e["align_initial_relative_error"] for e in rep["layers"])
    final = sum(e["align_relative_error"] for e in rep["layers"])
    assert final < init


def test_scores_follow_the_formula(result):
    layers = result.report["layers"]
    C = [e["C"] for e in layers]
    R = [e["R"] for e in layers]
    assert [e["score"] for e in layers] == pytest.approx(expected_scores(C, R))


def test_choice_honours_ratio_and_first_last(result):
    rep = result.report
    chosen = rep["chosen_layers"]
    assert len(chosen) == num_sparse_layers(LAYERS, 1, 3) == 2
    assert chosen == [0, LAYERS - 1]  # two sparse layers, both forced
    assert [e["layer"] for e in rep["layers"] if e["sparse"]] == chosen


def test_fixed_seed_reproduces_and_ratio_without_forcing(model, tokenizer, result):
    again = score_model(model, tokenizer, tiny_settings(), progress=False).report
    assert again["chosen_layers"] == result.report["chosen_layers"]
    assert [e["score"] for e in again["layers"]] == [e["score"] for e in result.report["layers"]]
    assert [e["loss"] for e in again["layers"]] == [e["loss"] for e in result.report["layers"]]

    free = score_model(model, tokenizer, tiny_settings(ratio="1:1", keep_first_last=False), progress=False).report
    layers = free["layers"]
    scores = expected_scores([e["C"] for e in layers], [e["R"] for e in layers])
    loss = [e["loss"] for e in layers]
    # the three best scores, ties to the larger swapped loss, then the lower index
    best = sorted(range(LAYERS), key=lambda i: (-scores[i], -loss[i], i))[:3]
    assert free["chosen_layers"] == sorted(best)
    assert free["forced_layers"] == []


class StudentInLlama(nn.Module):
    """A student in place of a transformers LlamaAttention (same call convention)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        B, T, _ = hidden_states.shape
        cos, sin = position_embeddings
        pos = torch.arange(T).view(1, -1).expand(B, -1)
        ctx = AttentionContext(pos, cos.float(), sin.float(), None, None, None, None)
        return self.student(hidden_states, ctx), None


def test_swapped_loss_matches_transformers_forward(model, tokenizer, result, written):
    """The sweep's loss for a layer equals transformers' own Llama forward with that attention replaced by the
    saved student, on the same held-out text."""
    from hybridize.select.alignment import init_students
    from hybridize.select.data import calibration_data

    s = tiny_settings(compare_uniform=True)
    data = calibration_data(tokenizer, train_seqs=s.align.steps * s.align.batch_size,
                            heldout_seqs=s.heldout_seqs + s.compare_seqs, seq_len=s.seq_len,
                            heldout_seq_len=s.heldout_seq_len, seed=s.seed)
    heldout = data.heldout[: s.heldout_seqs]
    assert heldout_loss(model, heldout) == pytest.approx(result.report["teacher"]["loss"], rel=1e-5)

    tensors = load_student_tensors(written / "students.safetensors")
    students = init_students(model)
    layer = 2
    prefix = f"model.layers.{layer}.self_attn."
    students[layer].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    original = model.model.layers[layer].self_attn
    model.model.layers[layer].self_attn = StudentInLlama(students[layer])
    try:
        loss = heldout_loss(model, heldout)
    finally:
        model.model.layers[layer].self_attn = original
    assert loss == pytest.approx(result.report["layers"][layer]["loss"], rel=1e-5)


def test_files_on_disk(written, result):
    rep = json.loads((written / "report.json").read_text())
    assert rep["chosen_layers"] == result.report["chosen_layers"]
    png = (written / "scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(written / "scores.png"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    tensors = load_student_tensors(written / "students.safetensors")
    assert {k.split(".")[2] for k in tensors} == {str(i) for i in range(LAYERS)}


def test_students_load_into_the_converted_hybrid(model, written):
    tensors = load_student_tensors(written / "students.safetensors")
    hybrid = hybrid_with_students(model, [0, LAYERS - 1], tensors, hype=True)
    for i in range(1, LAYERS - 1):
        got = hybrid.model.layers[i].self_attn.state_dict()
        for k, v in got.items():
            assert torch.equal(v, tensors[f"model.layers.{i}.self_attn.{k}"]), (i, k)
    # the attention layers kept the teacher's weights (o_proj doubled for the zero-initialised gate)
    assert torch.equal(hybrid.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_compare_uniform_reports_both_losses(result):
    c = result.report["compare"]
    assert c["sala"]["layers"] == result.report["chosen_layers"]
    assert c["uniform"]["layers"] == uniform_layers(LAYERS, 2)
    for name in ("sala", "uniform"):
        assert c[name]["loss_rope"] > 0 and c[name]["loss_nope"] > 0


def test_registry_reads_a_saved_report(model, written, result):
    assert {"uniform", "sala", "block_influence"} <= set(SELECTORS)
    chosen = get_selector("sala")(model, 2, score_report=written / "report.json")
    assert chosen == result.report["chosen_layers"]
    three = get_selector("sala")(model, 3, score_report=written, keep_first_last=False)
    layers = result.report["layers"]
    scores = expected_scores([e["C"] for e in layers], [e["R"] for e in layers])
    assert three == sorted(sorted(range(LAYERS), key=lambda i: (-scores[i], -layers[i]["loss"], i))[:3])
    other = tiny_llama(layers=4, vocab=model.config.vocab_size)
    with pytest.raises(ValueError, match="scores 6 layers"):
        get_selector("sala")(other, 1, score_report=written)
    with pytest.raises(ValueError, match="not block_influence"):
        get_selector("block_influence")(model, 1, score_report=written)


def test_block_influence_method(model, tokenizer):
    rep = score_model(model, tokenizer, tiny_settings(method="block_influence", ratio="1:1", keep_first_last=False),
                      progress=False).report
    bi = [e["block_influence"] for e in rep["layers"]]
    assert all(0.0 <= b <= 2.0 for b in bi)
    assert rep["chosen_layers"] == sorted(sorted(range(LAYERS), key=lambda i: (-bi[i], i))[:3])
    assert all(e["C"] is None for e in rep["layers"])


def test_cli_scores_a_model_folder(model, tokenizer, tmp_path):
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "scores"
    args = ["score", str(src), "-o", str(out), "--seq-len", "64", "--align-steps", "3", "--heldout-seqs", "2",
            "--passkey-lengths", "200", "--kv-lengths", "200", "--samples", "1", "--quiet", "--threads", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["layers"]) == LAYERS and rep["chosen_layers"] == [0, LAYERS - 1]
    assert (out / "scores.png").is_file() and (out / "students.safetensors").is_file()
    # the same output again: refused with a one-line error, nothing changed
    before = (out / "report.json").read_text()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "error:" in res.output and "--force" in res.output
    assert (out / "report.json").read_text() == before


def test_cli_bad_input_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(main, ["score", str(tmp_path / "missing"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error:")
    res = CliRunner().invoke(main, ["score", "--ratio", "1:x", "-o", str(tmp_path / "o"), "--method",
                                    "block_influence"])
    assert res.exit_code == 2 and "--ratio" in res.output
    assert not (tmp_path / "o").exists()


def test_score_refuses_a_foreign_output_before_scoring(tmp_path, monkeypatch):
    """--force over a folder score did not write, or the current folder, is refused at once: no model is read."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("the user's")
    res = CliRunner().invoke(main, ["score", str(tmp_path / "missing-model"), "-o", str(foreign), "--force"])
    assert res.exit_code == 2 and "not an output of this hybridize command" in res.output
    assert (foreign / "notes.txt").read_text() == "the user's"
    monkeypatch.chdir(foreign)
    res = CliRunner().invoke(main, ["score", str(tmp_path / "missing-model"), "-o", ".", "--force"])
    assert res.exit_code == 2 and "current folder" in res.output


def test_qk_norm_family_scores(tokenizer):
    """A Qwen3-shaped source (per-head q/k norms): the reference run reproduces transformers' loss, students build."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(5)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-trivial norms, so dropping them would show
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    s = tiny_settings(align=AlignSettings(steps=2, batch_size=1))
    rep = score_model(model, tokenizer, s, progress=False).report
    from hybridize.select.data import calibration_data

    data = calibration_data(tokenizer, train_seqs=2, heldout_seqs=s.heldout_seqs, seq_len=s.seq_len,
                            heldout_seq_len=s.heldout_seq_len, seed=s.seed)
    assert heldout_loss(model, data.heldout) == pytest.approx(rep["teacher"]["loss"], rel=1e-5)
    # 1:3 of 3 layers keeps one layer; with first/last forcing and room for one, the first layer
    assert len(rep["layers"]) == 3 and rep["chosen_layers"] == [0]


def test_text_sources(model, tokenizer, tmp_path):
    """Calibration text from a user's file and from the teacher itself (no corpus needed)."""
    text = read_text_files(shakespeare_files()[2:3], 60_000)
    path = tmp_path / "mine.txt"
    path.write_text(text)
    rep = score_model(model, tokenizer, tiny_settings(method="block_influence", text=str(path)), progress=False).report
    assert rep["calibration"]["source"] == str(path)
    held = tokenizer(text[int(len(text) * 0.8):], add_special_tokens=False)["input_ids"][:128]
    assert heldout_loss(model, torch.tensor(held).view(2, 64)) == pytest.approx(rep["teacher"]["loss"], rel=1e-5)

    rep = score_model(model, tokenizer, tiny_settings(method="block_influence", text="teacher"), progress=False).report
    assert rep["calibration"]["source"] == "text sampled from the teacher"
    assert rep["calibration"]["heldout_tokens"] == 128
    with pytest.raises(FileNotFoundError, match="--text"):
        score_model(model, tokenizer, tiny_settings(method="block_influence", text=str(tmp_path / "nope")),
                    progress=False)


def window_settings(**overrides) -> ScoreSettings:
    return tiny_settings(**{"method": "window", "window": 48, "sinks": 2, "keep_first_last": False, **overrides})


@pytest.fixture(scope="module")
def window_result(model, tokenizer):
    return score_model(model, tokenizer, window_settings(), progress=False)


def _hybrid_answer_logp(model, probes, s: ScoreSettings, whole: set[int], hype: bool) -> float:
    """The probes' mean answer log-probability under a converted hybrid: every layer not in `whole` a fresh windowed
    Lightning layer, the `whole` ones sparse (dense at these lengths; NoPE with `hype`)."""
    from hybridize.convert.build import build_hybrid

    types = ["sparse" if i in whole else "lightning" for i in range(LAYERS)]
    m = build_hybrid(model, types, hype=hype, output_gates=False, lightning_window=s.window, lightning_sinks=s.sinks)
    total, count = 0.0, 0
    for p in probes:
        with torch.no_grad():
            lp = torch.log_softmax(m(p.input_ids[None]).logits[0].float(), -1)
        for a, b in p.answer_spans:
            total += lp[torch.arange(a - 1, b - 1), p.input_ids[a:b]].sum().item()
            count += b - a
    return total / count


def _assert_search_measures_hybrids(model, tokenizer, report, hype: bool) -> None:
    from hybridize.select.probes import build_probes

    s = window_settings()
    probes = build_probes(tokenizer, s.probes, seed=s.seed)
    assert min(len(p.input_ids) for p in probes) > 2 * s.window  # answers lie beyond the window

    def answer_logp(whole) -> float:
        return _hybrid_answer_logp(model, probes, s, whole, hype)

    search = report["window_search"]
    assert report["method"] == "window" and len(report["chosen_layers"]) == num_sparse_layers(LAYERS, 1, 3) == 2
    assert search["all_cut_answer_logp"] == pytest.approx(answer_logp(set()), abs=1e-4)
    first, second = (r["layer"] for r in search["rounds"])
    assert report["chosen_layers"] == sorted([first, second])
    assert search["rounds"][1]["answer_logp"] == pytest.approx(answer_logp({first, second}), abs=1e-4)
    singles = {i: answer_logp({i}) for i in range(LAYERS)}
    assert max(singles, key=singles.get) == first
    assert search["rounds"][0]["answer_logp"] == pytest.approx(singles[first], abs=1e-4)
    pairs = {i: answer_logp({first, i}) for i in range(LAYERS) if i != first}
    assert max(pairs, key=pairs.get) == second
    # scores: each pick's gain at its round
    assert report["layers"][first]["score"] == pytest.approx(singles[first] - search["all_cut_answer_logp"], abs=1e-4)
    assert report["layers"][second]["score"] == pytest.approx(pairs[second] - singles[first], abs=1e-4)


def test_window_search_measures_the_hybrid_it_chooses(model, tokenizer, window_result):
    """The answer log-probabilities the search reports are those of full Llama-shaped forwards of converted hybrids:
    every layer a fresh windowed Lightning layer (its window branch is the source's attention over the first 2 and
    last 48 tokens), and the chosen layers given back their full attention. The first pick raised it most of all
    single layers, and the chosen two beat every pair that shares the first pick."""
    _assert_search_measures_hybrids(model, tokenizer, window_result.report, hype=False)


def test_window_search_with_nope_measures_the_hype_hybrid(model, tokenizer, window_result):
    """`nope`: the kept layers are measured as a HyPE hybrid runs its sparse layers (their attention without RoPE), so
    every reported number is a HyPE hybrid's forward; the runner's own attention keeps RoPE for everything else."""
    from hybridize.select.runner import LayerRunner, reference_hybrid
    from hybridize.select.window_search import nope_attention

    nope = score_model(model, tokenizer, window_settings(nope=True), progress=False).report
    assert nope["settings"]["nope"] is True
    _assert_search_measures_hybrids(model, tokenizer, nope, hype=True)
    # NoPE changes what the kept layers give (little in this random model: 7e-4 nats)
    assert nope["window_search"]["rounds"][0]["answer_logp"] != pytest.approx(
        window_result.report["window_search"]["rounds"][0]["answer_logp"], abs=1e-5)
    runner = LayerRunner(reference_hybrid(model))
    copies = nope_attention(runner)
    assert all(layer.self_attn.use_rope for layer in runner.layers) and not any(a.use_rope for a in copies)
    assert all(a.q_proj.weight is layer.self_attn.q_proj.weight for a, layer in zip(copies, runner.layers))


def test_restoring_each_layer_matches_separate_forwards(model, tokenizer):
    """The greedy round's shortcut: probes of one length in one batch, each layer's variant run from the stream the
    base forward kept at that layer; every variant's answer log-probability is what its own forward gives."""
    from hybridize.select.probes import build_probes
    from hybridize.select.runner import LayerRunner, reference_hybrid
    from hybridize.select.sweep import Sweep
    from hybridize.select.window_search import window_cuts

    s = window_settings()
    probes = build_probes(tokenizer, s.probes, seed=s.seed)
    sweep = Sweep(LayerRunner(reference_hybrid(model)), torch.randint(0, len(tokenizer), (2, 64)), probes)
    batches = sweep.probe_batches()
    assert sum(len(b) for b in batches) == len(probes) and max(len(b) for b in batches) > 1
    assert all(len({inp.ids.shape[1] for inp in b}) == 1 for b in batches)
    cuts = window_cuts(model, s.window, s.sinks)
    replace = {j: cuts[j] for j in (0, 2, 3, 5)}
    base, variants = sweep.answer_logp_restoring(replace, [0, 3, 5])
    assert base == pytest.approx(sweep.answer_logp(replace), abs=1e-5)
    for i, v in variants.items():
        assert v == pytest.approx(sweep.answer_logp({j: m for j, m in replace.items() if j != i}), abs=1e-5)
    assert len(set(round(v, 4) for v in variants.values())) == 3  # the variants differ: each restored its own layer


def _hybrid_text_logp(model, ids: torch.Tensor, s: ScoreSettings, whole: set[int], hype: bool) -> float:
    """Mean next-token log-probability of `ids` under the converted hybrid `_hybrid_answer_logp` builds."""
    from hybridize.convert.build import build_hybrid

    types = ["sparse" if i in whole else "lightning" for i in range(LAYERS)]
    m = build_hybrid(model, types, hype=hype, output_gates=False, lightning_window=s.window, lightning_sinks=s.sinks)
    with torch.no_grad():
        lp = torch.log_softmax(m(ids).logits[:, :-1].float(), -1)
    return lp.gather(-1, ids[:, 1:, None]).mean().item()


@pytest.mark.parametrize("weight", [1.0, 1000.0])
def test_window_search_with_general_weight_measures_text_beside_answers(model, tokenizer, weight):
    """`general_weight`: each round adds the held-out text's next-token log-probability (times the weight) to the
    probes' answer log-probability. Every number a round reports is a converted HyPE hybrid's forward, and each pick
    is the best layer by that sum over all candidates (at a weight of 1000 the text decides alone)."""
    from hybridize.select.data import calibration_data
    from hybridize.select.probes import build_probes

    s = window_settings(nope=True, general_weight=weight, heldout_seq_len=120)
    report = score_model(model, tokenizer, s, progress=False).report
    probes = build_probes(tokenizer, s.probes, seed=s.seed)
    text = calibration_data(tokenizer, train_seqs=0, heldout_seqs=s.heldout_seqs, seq_len=s.seq_len,
                            heldout_seq_len=s.heldout_seq_len, seed=s.seed).heldout
    assert text.shape == (2, 120)

    def measured(whole) -> tuple[float, float]:
        return (_hybrid_answer_logp(model, probes, s, whole, True), _hybrid_text_logp(model, text, s, whole, True))

    rounds = report["window_search"]["rounds"]
    first, second = (r["layer"] for r in rounds)
    singles = {i: measured({i}) for i in range(LAYERS)}
    assert rounds[0]["answer_logp"] == pytest.approx(singles[first][0], abs=1e-4)
    assert rounds[0]["text_logp"] == pytest.approx(singles[first][1], abs=1e-4)
    assert rounds[0]["objective"] == pytest.approx(singles[first][0] + weight * singles[first][1], rel=1e-5)
    assert max(singles, key=lambda i: singles[i][0] + weight * singles[i][1]) == first
    pairs = {i: measured({first, i}) for i in range(LAYERS) if i != first}
    assert max(pairs, key=lambda i: pairs[i][0] + weight * pairs[i][1]) == second
    assert rounds[1]["text_logp"] == pytest.approx(pairs[second][1], abs=1e-4)
    if weight > 100:
        assert first == max(singles, key=lambda i: singles[i][1])
    # the text measure is not the answers' in disguise: the layers rank differently by each
    by_text = sorted(range(LAYERS), key=lambda i: singles[i][1])
    assert by_text != sorted(range(LAYERS), key=lambda i: singles[i][0])


def test_general_weight_needs_text_past_the_window(model, tokenizer):
    with pytest.raises(ValueError, match="must exceed the window"):
        score_model(model, tokenizer, window_settings(general_weight=1.0, heldout_seq_len=50), progress=False)
    with pytest.raises(ValueError, match="general_weight must be at least 0"):
        window_settings(general_weight=-1.0).validate()


def test_a_window_report_gives_back_the_layers_its_rounds_picked(window_result):
    """Re-reading a window search's report (the score cache, --score-report) returns the layers in the order its
    rounds picked them, even where a layer it passed over has a larger last-round gain than an earlier pick's gain
    (later gains can be larger: the layers work together)."""
    import copy

    from hybridize.select.selectors import choose_from_report

    rep = window_result.report
    picks = [r["layer"] for r in rep["window_search"]["rounds"]]
    assert choose_from_report(rep, len(picks)) == rep["chosen_layers"] == sorted(picks)
    assert choose_from_report(rep, 1) == [picks[0]]
    skewed = copy.deepcopy(rep)
    passed_over = next(e for e in skewed["layers"] if e["layer"] not in picks)
    passed_over["score"] = max(e["score"] for e in skewed["layers"]) + 1.0
    assert choose_from_report(skewed, len(picks)) == sorted(picks)
    assert choose_from_report(skewed, len(picks) + 1) == sorted(picks + [passed_over["layer"]])
    with pytest.raises(ValueError, match="keep_first_last=False"):
        choose_from_report(rep, len(picks), keep_first_last=True)


def test_window_method_refuses_probes_inside_the_window(model, tokenizer):
    with pytest.raises(ValueError, match="under twice the window"):
        score_model(model, tokenizer, window_settings(window=128), progress=False)
    with pytest.raises(ValueError, match="window must be at least 1"):
        window_settings(window=0).validate()


def test_window_selector_caches_per_window(model, tokenizer, tmp_path):
    """Through the registry (as convert and recipes call it): scored once per window and kept; another window is
    another report."""
    pick = get_selector("window")
    logs: list[str] = []
    first = pick(model, 2, tokenizer=tokenizer, window=64, sinks=2, cache_dir=tmp_path, progress=False,
                 log=logs.append)
    files = sorted(p.name for p in (tmp_path / "scores").iterdir())
    assert len(files) == 1 and files[0].startswith("window-sinks2-window64-")
    report = json.loads((tmp_path / "scores" / files[0]).read_text())
    assert report["settings"]["window"] == 64 and report["chosen_layers"] == first
    assert min(report["settings"]["probes"]["passkey_lengths"]) >= 2 * 64
    again = pick(model, 2, tokenizer=tokenizer, window=64, sinks=2, cache_dir=tmp_path, progress=False,
                 log=logs.append)
    assert again == first and logs[-1].startswith("layer scores (window)")
    pick(model, 2, tokenizer=tokenizer, window=128, sinks=2, cache_dir=tmp_path, progress=False, log=logs.append)
    assert len(list((tmp_path / "scores").iterdir())) == 2
    # another objective is another report too: the held-out text beside the answers
    pick(model, 2, tokenizer=tokenizer, window=64, sinks=2, general_weight=1.0, cache_dir=tmp_path, progress=False,
         log=logs.append)
    weighted = [p for p in (tmp_path / "scores").iterdir() if p.name.startswith("window-general_weight1.0-sinks2-")]
    assert len(weighted) == 1 and len(list((tmp_path / "scores").iterdir())) == 3
    report = json.loads(weighted[0].read_text())
    assert report["settings"]["general_weight"] == 1.0 and report["settings"]["heldout_seq_len"] > 64 + 2
    assert all("text_logp" in r for r in report["window_search"]["rounds"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of the cache: a GPU scores with other settings")
def test_a_cpu_reads_a_gpu_scored_report_but_writes_its_own_apart(model, tokenizer, tmp_path):
    """A CPU's smaller settings can choose other layers than a GPU's: a report it scores is named "-cpu-" (so that a
    GPU never takes it for its own), while a report scored on a GPU (the plain name, as committed caches hold) serves
    the CPU without scoring again."""
    pick = get_selector("window")
    logs: list[str] = []
    first = pick(model, 2, tokenizer=tokenizer, window=64, sinks=2, cache_dir=tmp_path, progress=False,
                 log=logs.append)
    (cpu_file,) = (tmp_path / "scores").iterdir()
    assert cpu_file.name.startswith("window-sinks2-window64-cpu-"), cpu_file.name
    # the same report under the GPU's name, its chosen layers changed: the CPU now reads that one
    gpu_file = cpu_file.with_name(cpu_file.name.replace("-cpu-", "-"))
    report = json.loads(cpu_file.read_text())
    other = [i for i in range(model.config.num_hidden_layers) if i not in first][:2]
    report["chosen_layers"] = sorted(other)
    for rnd, layer in zip(report["window_search"]["rounds"], sorted(other)):
        rnd["layer"] = layer
    gpu_file.write_text(json.dumps(report))
    again = pick(model, 2, tokenizer=tokenizer, window=64, sinks=2, cache_dir=tmp_path, progress=False,
                 log=logs.append)
    assert again == sorted(other) != first
    assert logs[-1] == f"layer scores (window): {gpu_file}"


def test_convert_places_layers_by_the_window_search_with_its_own_window(model, tokenizer, tmp_path, monkeypatch):
    """`hybridize convert --select window --lightning-window 64`: the search runs with the hybrid's window and its
    positions (HyPE, the default: the kept layers measured without RoPE; --no-hype: with it), its cached report names
    both, and the converted folder keeps the layers it chose."""
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    for flag, name in (("--hype", "window-nope-sinks4-window64-"), ("--no-hype", "window-sinks4-window64-")):
        out = tmp_path / f"hybrid{flag}"
        res = CliRunner().invoke(main, ["convert", str(src), "--select", "window", "--lightning-window", "64", flag,
                                        "-o", str(out), "--quiet"])
        assert res.exit_code == 0, res.output
        reports = list((tmp_path / "cache" / "scores").glob(f"{name}*.json"))
        assert len(reports) == 1, [p.name for p in (tmp_path / "cache" / "scores").iterdir()]
        report = json.loads(reports[0].read_text())
        assert report["settings"]["nope"] is (flag == "--hype")
        config = json.loads((out / "config.json").read_text())
        assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == report["chosen_layers"]
        assert config["lightning_window"] == 64 and config["conversion"]["method"] == "window"
        assert config["hype"] is (flag == "--hype")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("nope", [False, True])
def test_window_search_on_the_gpu_matches_the_cpu(model, tokenizer, nope):
    """The window search with the source on the GPU (as `prepare` and recipes run it) builds its cut layers (and, with
    `nope`, its NoPE kept layers) there and picks the layers the CPU picked, with the same answer log-probabilities."""
    import copy

    on_cpu = score_model(model, tokenizer, window_settings(nope=nope), progress=False).report
    on_gpu = copy.deepcopy(model).to("cuda")
    rep = score_model(on_gpu, tokenizer, window_settings(nope=nope), progress=False).report
    assert rep["chosen_layers"] == on_cpu["chosen_layers"]
    for a, b in zip(rep["window_search"]["rounds"], on_cpu["window_search"]["rounds"]):
        assert a["layer"] == b["layer"] and a["answer_logp"] == pytest.approx(b["answer_logp"], abs=2e-3)


def test_cli_window_method(model, tokenizer, tmp_path):
    src = tmp_path / "tiny"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    base = ["score", str(src), "--method", "window", "--sinks", "2", "--passkey-lengths", "200", "--kv-lengths", "200",
            "--samples", "1", "--heldout-seqs", "2", "--quiet", "--threads", "1", "--no-keep-first-last"]
    out = tmp_path / "scores"
    res = CliRunner().invoke(main, base + ["--window", "48", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == "window" and rep["settings"]["window"] == 48 and rep["settings"]["sinks"] == 2
    assert [r["layer"] for r in rep["window_search"]["rounds"]] and len(rep["chosen_layers"]) == 2
    assert (out / "scores.png").is_file() and not (out / "students.safetensors").exists()
    # answers inside the window: refused before reading the model, one line, nothing written
    res = CliRunner().invoke(main, base + ["--window", "128", "-o", str(tmp_path / "refused")])
    assert res.exit_code == 2 and "under twice the window" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    # --general-weight: the rounds also carry the held-out text's log-probability, which enters the objective
    res = CliRunner().invoke(main, base + ["--window", "48", "--general-weight", "2", "-o", str(tmp_path / "gw")])
    assert res.exit_code == 0, res.output
    rounds = json.loads((tmp_path / "gw" / "report.json").read_text())["window_search"]["rounds"]
    assert all(r["objective"] == pytest.approx(r["answer_logp"] + 2 * r["text_logp"]) for r in rounds)
    res = CliRunner().invoke(main, base + ["--general-weight", "-1", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "general_weight must be at least 0" in res.output
    assert not (tmp_path / "bad").exists()
