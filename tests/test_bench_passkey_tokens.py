"""bench/passkey_tokens.py: the pass-key answer token by token, on a real exported hybrid folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from eval_tools import save_source_and_hybrid, word_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_answer_tokens_are_the_keys_with_the_models_own_choice_beside_them(tmp_path):
    save_source_and_hybrid(tmp_path)
    out = tmp_path / "tokens.json"
    run = subprocess.run([sys.executable, str(BENCH / "passkey_tokens.py"), str(tmp_path / "hybrid"), "--lengths",
                          "96", "--depths", "0.2,0.8", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    probes = json.loads(out.read_text())["probes"]
    tok = word_tokenizer()
    assert [(p["length"], p["depth"]) for p in probes] == [(96, 0.2), (96, 0.8)]
    for p in probes:
        answer = tok(" " + p["key"], add_special_tokens=False)["input_ids"]
        assert [r["token"] for r in p["tokens"]] == [tok.decode([t]) for t in answer]
        for r in p["tokens"]:  # the top choice is at least as likely as the answer's token, equal where it is it
            assert r["top_logprob"] >= r["logprob"] - 1e-3 and r["logprob"] <= 0
            if r["top"] == r["token"]:
                assert abs(r["top_logprob"] - r["logprob"]) < 1e-3
    assert len(run.stdout.strip().splitlines()) == 2 and probes[0]["key"] in run.stdout
