"""Pass-key retrieval: a model that copies scores 1.0, random models score near chance."""

import json


from eval_tools import CopyConfig, CopyModel, word_tokenizer
from helpers import TINY_SPARSE, tiny_llama
from hybridize.arch.configuration_hybridize import default_layer_types
from hybridize.convert.build import build_hybrid
from hybridize.eval.report import eval_table, write_eval_report
from hybridize.eval.retrieval import build_probe, passkey_retrieval, score_candidates

LENGTHS = (64, 128, 256)


def test_probe_has_exact_length_and_needle_at_depth():
    tok = word_tokenizer()
    key_ids = tok(" 90817", add_special_tokens=False)["input_ids"]
    positions = []
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = build_probe(tok, 128, depth, "90817")
        assert len(prompt) == 128 and answer == key_ids
        at = next(i for i in range(len(prompt)) if prompt[i : i + 5] == key_ids)
        positions.append(at)
        assert prompt.count(key_ids[0]) >= 1 and key_ids[0] not in prompt[at + 5 :]  # the key appears once
    assert positions[0] < positions[1] < positions[2]


def test_copy_model_retrieves_every_key():
    tok = word_tokenizer()
    model = CopyModel(CopyConfig(vocab_size=len(tok)))
    r = passkey_retrieval(model, tok, LENGTHS, trials=1, chunk_size=48)  # several chunks per prompt
    assert r.accuracy == 1.0 and r.choice_accuracy == 1.0
    assert r.grid == [[1.0] * 5] * 3
    assert all(p.first_miss == -1 for p in r.probes)


def test_first_miss_is_where_greedy_decoding_leaves_the_answer():
    """The copying model writes the key it read: scored against the key with one token changed, greedy decoding
    leaves that answer at the changed token and no earlier."""
    tok = word_tokenizer()
    model = CopyModel(CopyConfig(vocab_size=len(tok)))
    prompt, key = build_probe(tok, 96, 0.5, "90817")
    other = [t for t in tok(" 1 2 3", add_special_tokens=False)["input_ids"] if t not in key][0]
    changed = [key[:j] + [other] + key[j + 1:] for j in range(len(key))]
    logp, greedy, first_miss = score_candidates(model, prompt, [key] + changed, chunk_size=40)
    assert greedy.tolist() == [True] + [False] * len(key)
    assert first_miss.tolist() == [-1] + list(range(len(key)))
    assert logp[0] > logp[1:].max()


def test_random_models_score_near_chance():
    tok = word_tokenizer()
    dense = tiny_llama(vocab=len(tok), seed=1)
    hybrid = build_hybrid(tiny_llama(vocab=len(tok), seed=2), default_layer_types(4))
    hybrid.config.update(TINY_SPARSE)
    for model in (dense, hybrid):
        r = passkey_retrieval(model, tok, LENGTHS, trials=2, seed=3, chunk_size=100)
        assert r.chance == 0.1
        assert r.accuracy <= 0.05  # exact 5-digit keys: chance is 1e-5
        assert r.choice_accuracy <= 0.3  # 1 of 10: chance is 0.1 (30 probes)


def test_eval_report_puts_models_side_by_side(tmp_path):
    tok = word_tokenizer()
    copy = CopyModel(CopyConfig(vocab_size=len(tok)))
    rand = tiny_llama(vocab=len(tok))
    results = {"models": {
        name: {"retrieval": passkey_retrieval(m, tok, (64, 96), depths=(0.0, 1.0)).to_dict()}
        for name, m in (("copy", copy), ("random", rand))
    }}
    table = eval_table(results)
    lines = table.splitlines()
    assert lines[0] == "| metric | copy | random |"
    row = next(line for line in lines if line.startswith("| pass key accuracy (greedy"))
    assert row.split("|")[2].strip() == "1" and row.split("|")[3].strip() == "0"
    paths = write_eval_report(results, tmp_path)
    assert json.loads(paths["json"].read_text())["models"]["copy"]["retrieval"]["accuracy"] == 1.0
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_seed_alone_fixes_the_probes_across_processes():
    """Two interpreters with different string-hash seeds draw the same probes (keys, the asked one, the prompt)."""
    import os
    import subprocess
    import sys

    code = ("import random, json; from hybridize.eval.retrieval import make_probe; from eval_tools import "
            "word_tokenizer; tok = word_tokenizer(); rng = random.Random(5); "
            "print(json.dumps([(p.answer, p.prompt, p.candidates) for p in "
            "[make_probe(t, tok, 128, 0.5, rng) for t in ('passkey', 'multikey', 'kv')]]))")
    here = os.path.dirname(__file__)
    outs = []
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": os.pathsep.join(
            [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outs.append(json.loads(done.stdout))
    assert outs[0] == outs[1] == outs[2]
