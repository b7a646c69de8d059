"""`hybridize convert` end to end, through the CLI: every family in every format it ships in.

With every layer sparse, HyPE off and no gates, the hybrid must compute exactly what the source computes (short
sequences run dense causal attention in sparse layers); with --ratio 1:3 it must load with trust_remote_code and
generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from hybridize.cli import main

VOCAB = 97
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

FAMILIES = {
    "llama": lambda layers=2: LlamaConfig(num_hidden_layers=layers, **SHAPE),
    "llama3-rope": lambda layers=2: LlamaConfig(num_hidden_layers=layers, rope_parameters=LLAMA3_ROPE, **SHAPE),
    "mistral": lambda layers=2: MistralConfig(num_hidden_layers=layers, sliding_window=256, **SHAPE),
    "qwen2": lambda layers=2: Qwen2Config(num_hidden_layers=layers, tie_word_embeddings=True, **SHAPE),
    "qwen3": lambda layers=2: Qwen3Config(num_hidden_layers=layers, head_dim=24, tie_word_embeddings=True, **SHAPE),
    "phi3": lambda layers=2: Phi3Config(num_hidden_layers=layers, **SHAPE),
}
FORMATS = ("hf-safetensors-sharded", "hf-bin", "single-file")


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # random, so that a dropped bias or norm shows
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
        model.get_output_embeddings().weight.mul_(8.0)  # confident logits: greedy choices are not rounding noise
    return model


def save_source(model, folder: Path, fmt: str) -> Path:
    """`model` written the way it is distributed; returns what the user passes to convert."""
    folder.mkdir(parents=True)
    if fmt == "hf-safetensors-sharded":
        model.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").is_file()
        return folder
    if fmt == "hf-bin":  # the pre-safetensors layout: pytorch_model-0000i-of-0000n.bin + index (transformers 4.x)
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        names = list(state)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        weight_map = {}
        for i, part in enumerate(halves):
            shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, folder / shard)
            weight_map |= {k: shard for k in part}
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        return folder
    model.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, folder / "weights.safetensors")
    return folder / "weights.safetensors"


def run_convert(*args: str):
    return CliRunner().invoke(main, ["convert", *map(str, args), "--quiet"], catch_exceptions=False)


def converted_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def source_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_sparse_conversion_reproduces_logits(tmp_path, family, fmt):
    model = tiny_model(family)
    source = save_source(model, tmp_path / "src", fmt)
    out = tmp_path / "out"
    result = run_convert(source, "--output", out, "--ratio", "1:0", "--no-hype", "--no-gates")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["full_attention"] * 2
    diff = (converted_logits(out, IDS) - source_logits(model, IDS)).abs().max().item()
    assert diff <= 1e-4, f"{family}/{fmt}: max abs logit diff {diff}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_in_four_hybrid_loads_and_generates(tmp_path, family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](layers=4)).eval()
    source = save_source(model, tmp_path / "src", "hf-safetensors-sharded")
    out = tmp_path / "out"
    result = run_convert(source, "--output", out, "--ratio", "1:3")
    assert result.exit_code == 0, result.output
    assert "1 sparse of 4 layers, placed by uniform: [3]" in result.output  # no tokenizer: nothing to score with
    assert f"hybridize train recipes/retention.yaml --set model.source={source} (" in result.output
    hybrid = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hybrid.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    generated = hybrid.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 11)
    card = (out / "README.md").read_text()
    assert "LLLS" in card and "hybridize version" in card and str(source) in card


def test_auto_model_returns_the_last_hidden_state(tmp_path):
    """AutoModel (the bare decoder, no lm_head) of an export gives `last_hidden_state`, as any transformers model
    does, and its final position feeds the causal-LM head to the same logits."""
    from transformers import AutoModel

    source = save_source(tiny_model("llama"), tmp_path / "src", "hf-safetensors-sharded")
    out = tmp_path / "out"
    assert run_convert(source, "--output", out, "--ratio", "1:1").exit_code == 0
    base = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(base).__name__ == "HybridModel"
    with torch.no_grad():
        hidden = base(IDS).last_hidden_state
    assert hidden.shape == (*IDS.shape, 64)
    causal = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(causal.lm_head(hidden), causal(IDS).logits)


def test_untied_and_tied_heads_survive(tmp_path):
    """Untied: the output holds lm_head; tied: it does not, and the loaded model ties it to the embedding."""
    for family, tied in (("llama", False), ("qwen2", True)):
        model = tiny_model(family)
        source = save_source(model, tmp_path / family, "single-file")
        out = tmp_path / f"out-{family}"
        assert run_convert(source, "--output", out, "--ratio", "0:1").exit_code == 0
        hybrid = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        assert hybrid.config.tie_word_embeddings is tied
        same = hybrid.lm_head.weight.data_ptr() == hybrid.model.embed_tokens.weight.data_ptr()
        assert same is tied
        assert torch.equal(hybrid.lm_head.weight, model.lm_head.weight)


def test_wrapped_and_lightning_checkpoints(tmp_path):
    """{'state_dict': ...} wrappers and Lightning checkpoints (module attribute `model.` prefix) convert."""
    model = tiny_model("llama")
    folder = tmp_path / "src"
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = model.state_dict()
    torch.save({"state_dict": state}, folder / "wrapped.pt")
    torch.save(
        {
            "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.5.0",
            "state_dict": {f"model.{k}": v for k, v in state.items()} | {"loss_scale.weight": torch.ones(3)},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
            "hyper_parameters": {"lr": 1e-3, "name": "tiny"},
        },
        folder / "last.ckpt",
    )
    for name in ("wrapped.pt", "last.ckpt"):
        out = tmp_path / f"out-{name}"
        result = run_convert(folder / name, "--output", out, "--ratio", "1:0", "--no-hype", "--no-gates")
        assert result.exit_code == 0, result.output
        diff = (converted_logits(out, IDS) - source_logits(model, IDS)).abs().max().item()
        assert diff <= 1e-4


def test_config_option_for_a_bare_state_dict(tmp_path):
    model = tiny_model("mistral")
    (tmp_path / "cfg").mkdir()
    model.config.save_pretrained(tmp_path / "cfg")
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    out = tmp_path / "out"
    result = run_convert(tmp_path / "weights.bin", "--config", tmp_path / "cfg" / "config.json", "--output", out,
                         "--ratio", "1:0", "--no-hype", "--no-gates")
    assert result.exit_code == 0, result.output
    assert (converted_logits(out, IDS) - source_logits(model, IDS)).abs().max().item() <= 1e-4


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    """A hub id converts from the local cache alone (no network: nothing is mocked, the cache is real files)."""
    model = tiny_model("qwen3")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-qwen3" / "snapshots" / "0123456789abcdef"
    save_source(model, snapshot, "hf-safetensors-sharded")
    (cache / "models--tiny-org--tiny-qwen3" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-qwen3" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    result = run_convert("tiny-org/tiny-qwen3", "--output", out, "--ratio", "1:0", "--no-hype", "--no-gates")
    assert result.exit_code == 0, result.output
    assert (converted_logits(out, IDS) - source_logits(model, IDS)).abs().max().item() <= 1e-4
    assert "base_model: tiny-org/tiny-qwen3" in (out / "README.md").read_text()


def word_tokenizer(folder: Path) -> None:
    """A real (word-level) tokenizer with a chat template, so the output must carry both."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)


def test_output_folder_contents_and_samples(tmp_path):
    model = tiny_model("llama")
    source = save_source(model, tmp_path / "src", "hf-safetensors-sharded")
    word_tokenizer(source)
    out = tmp_path / "out"
    result = run_convert(source, "--output", out, "--ratio", "1:1", "--max-shard-size", "50KB", "--dtype", "bfloat16",
                         "--select", "uniform")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["linear_attention", "full_attention"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hybridize.HybridForCausalLM"
    assert config["conversion"]["method"] == "uniform" and config["conversion"]["ratio"] == "1:1"
    for name in ("generation_config.json", "tokenizer.json", "modeling_hybridize.py", "configuration_hybridize.py",
                 "ops.py", "README.md"):
        assert (out / name).is_file(), name
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}], tokenize=False) == "w5 w6 "
    hybrid = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert hybrid.model.embed_tokens.weight.dtype == torch.bfloat16
    # the before/after sample: the source's greedy continuation is printed as the source computes it
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in result.output.splitlines() if ":" in line}
    ids = tokenizer("The capital of France is", return_tensors="pt")
    expected = tokenizer.decode(model.generate(**ids, max_new_tokens=16, do_sample=False)[0], skip_special_tokens=True)
    assert lines["source"] == repr(expected)
    assert "hybrid" in lines


def test_default_placement_scores_a_small_source_with_a_tokenizer(tmp_path, monkeypatch):
    """Without --select or --layers, a source that convert runs unasked keeps the layers block influence scores
    highest, as `--select block_influence` does, without writing a score cache; without a tokenizer (scoring reads
    text) the layers are spaced evenly."""
    monkeypatch.setenv("HYBRIDIZE_CACHE", str(tmp_path / "cache"))
    source = save_source(_tiny4(), tmp_path / "src", "hf-safetensors-sharded")
    bare = save_source(_tiny4(), tmp_path / "bare", "hf-safetensors-sharded")
    word_tokenizer(source)

    def convert(src, name, *args):
        result = run_convert(src, "--output", tmp_path / name, "--ratio", "1:3", "--no-sample", *args)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / name / "config.json").read_text())

    default = convert(source, "default")
    assert default["conversion"]["method"] == "block_influence"
    assert not (tmp_path / "cache").exists()
    scored = convert(source, "scored", "--select", "block_influence")
    assert default["layer_types"] == scored["layer_types"] and default["layer_types"].count("full_attention") == 1
    without = convert(bare, "bare-out")
    assert without["conversion"]["method"] == "uniform"
    assert without["layer_types"] == convert(bare, "uniform", "--select", "uniform")["layer_types"]


def _tiny4():
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(FAMILIES["llama"](4), dtype=torch.float32).eval()


def test_explicit_layers_and_select(tmp_path):
    model = tiny_model("llama")
    source = save_source(model, tmp_path / "src", "single-file")
    out = tmp_path / "out"
    result = run_convert(source, "--output", out, "--layers", "0", "--select", "layers")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["layer_types"] == ["full_attention", "linear_attention"]
    out2 = tmp_path / "out2"
    assert run_convert(source, "--output", out2, "--ratio", "0:1", "--select", "uniform").exit_code == 0
    assert json.loads((out2 / "config.json").read_text())["layer_types"] == ["linear_attention"] * 2
    # --force replaces an existing output
    assert run_convert(source, "--output", out, "--ratio", "1:0", "--force").exit_code == 0
    assert json.loads((out / "config.json").read_text())["layer_types"] == ["full_attention"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out2", "src"]


def test_select_method_comes_from_the_registry(tmp_path, monkeypatch):
    """A method registered in hybridize.select.registry gets the source model with its real weights; its choice is
    the layer map. (The test's method keeps the layers whose q_proj has the largest norm.)"""
    from hybridize.select import registry

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(FAMILIES["llama"](layers=4)).eval()
    source = save_source(model, tmp_path / "src", "single-file")
    seen = {}

    def largest_q(candidate, n_sparse, **kw):
        seen["q0"] = candidate.model.layers[0].self_attn.q_proj.weight.detach().clone()
        seen["kw"] = kw
        norms = [layer.self_attn.q_proj.weight.norm().item() for layer in candidate.model.layers]
        return sorted(sorted(range(len(norms)), key=lambda i: -norms[i])[:n_sparse])

    monkeypatch.setitem(registry.SELECTORS, "largest-q", largest_q)
    out = tmp_path / "out"
    result = run_convert(source, "--output", out, "--ratio", "1:1", "--select", "largest-q")
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(seen["q0"], model.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    assert seen["kw"].get("tokenizer") is None  # the source has no tokenizer
    norms = [layer.self_attn.q_proj.weight.norm().item() for layer in model.model.layers]
    expected = {i for i in range(4) if norms[i] >= sorted(norms)[2]}
    layer_types = json.loads((out / "config.json").read_text())["layer_types"]
    assert {i for i, t in enumerate(layer_types) if t == "full_attention"} == expected
    assert json.loads((out / "config.json").read_text())["conversion"]["method"] == "largest-q"


def test_gguf_default_model_converts(tmp_path):
    """No SOURCE: the built-in SmolLM2-135M (GGUF) converts. (The before/after sample is checked on a tiny model in
    test_output_folder_contents_and_samples: on the default model it costs more than the conversion.)"""
    pytest.importorskip("gguf")
    out = tmp_path / "smol"
    result = run_convert("--output", out, "--no-sample")
    assert result.exit_code == 0, result.output
    assert "8 sparse of 30 layers, placed by block_influence" in result.output
    assert "next: train it to recover the source's quality: hybridize train recipes/retention.yaml (" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"].count("full_attention") == 8 and config["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config or (out / "chat_template.jinja").is_file()
    assert "SmolLM2" in (out / "README.md").read_text()
    from transformers import AutoTokenizer

    exported = AutoTokenizer.from_pretrained(out)  # the end of text the model was trained to write, on any version
    assert (exported.eos_token, exported.eos_token_id) == ("<|im_end|>", config["eos_token_id"])


def test_special_tokens_follow_the_model_config(tmp_path):
    """transformers 5.17 reads SmolLM2's GGUF tokenizer with eos '<|im_start|>'; the config's ids win."""
    from eval_tools import word_tokenizer
    from transformers import LlamaConfig

    from hybridize.convert.default_model import align_special_tokens

    tok = word_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.eos_token = tok.bos_token  # what 5.17 hands over
    align_special_tokens(tok, LlamaConfig(bos_token_id=bos, eos_token_id=eos))
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("</s>", eos, bos)
    align_special_tokens(tok, LlamaConfig(bos_token_id=None, eos_token_id=[bos, eos]))  # lists and None: kept as is
    assert (tok.eos_token_id, tok.bos_token_id) == (eos, bos)


def test_progress_bar_reports_bytes(tmp_path):
    model = tiny_model("llama")
    source = save_source(model, tmp_path / "src", "single-file")
    result = CliRunner().invoke(main, ["convert", str(source), "--output", str(tmp_path / "out"), "--no-sample"])
    assert result.exit_code == 0
    assert "reading + writing weights" in result.stderr and "100%" in result.stderr


def test_aligned_students_replace_the_fresh_lightning_weights(tmp_path):
    """--students puts the aligned Lightning weights of `hybridize score` into the Lightning layers, and only there."""
    from safetensors import safe_open

    from hybridize.select.alignment import init_students, save_students

    model = tiny_model("llama", seed=3)
    src = save_source(model, tmp_path / "src", "hf-safetensors-sharded")
    students = init_students(model, gates=True)
    with torch.no_grad():
        for p in students.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # stands in for alignment: any change must come through
    path = save_students(students, tmp_path / "students.safetensors", metadata={"gates": "True"})
    out = tmp_path / "out"
    result = run_convert(src, "--layers", "1", "--students", path, "--output", out, "--no-sample")
    assert result.exit_code == 0, result.output
    written = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            written |= {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(path), "pt") as f:
        aligned = {k: f.get_tensor(k) for k in f.keys()}
    lightning_keys = [k for k in aligned if k.startswith("model.layers.0.")]
    assert lightning_keys and all(torch.equal(written[k], aligned[k]) for k in lightning_keys)
    # the sparse layer keeps the source's projections, not the student's
    sparse_q = written["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(sparse_q, model.model.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(sparse_q, aligned["model.layers.1.self_attn.q_proj.weight"])
    # students aligned with gates do not fit a gate-less conversion: one-line error, no output
    bad = run_convert(src, "--layers", "1", "--students", path, "--no-gates", "--output", tmp_path / "bad")
    assert bad.exit_code == 2 and "--gates" in bad.output and not (tmp_path / "bad").exists()
