"""Losses against independent computations, and packed documents against the same documents run one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hybridize.train.data import make_batch
from hybridize.train.losses import IGNORE, cross_entropy_sum, hidden_mse_sum, kl_sum
from hybridize.train.recipe import LossSpec
from hybridize.train.trainer import loss_parts, part_counts, weighted


pytestmark = pytest.mark.usefixtures("one_thread")


def _fixed_batch():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 7, 11, generator=g, dtype=torch.float64)
    t = torch.randn(1, 7, 11, generator=g, dtype=torch.float64) * 2
    targets = torch.tensor([[3, 5, IGNORE, 0, 10, 2, IGNORE]])
    return s, t, targets


def test_cross_entropy_matches_explicit_log_probabilities():
    s, _, targets = _fixed_batch()
    total, count = cross_entropy_sum(s, targets)
    expected, n = 0.0, 0
    for i, y in enumerate(targets[0].tolist()):
        if y == IGNORE:
            continue
        row = s[0, i].tolist()
        expected += math.log(sum(math.exp(v) for v in row)) - row[y]
        n += 1
    assert int(count) == n == 5
    assert float(total) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_explicit_sum_and_skips_ignored_positions(direction, temperature):
    s, t, targets = _fixed_batch()
    total, count = kl_sum(s, t, targets, temperature=temperature, direction=direction)
    expected = 0.0
    for i, y in enumerate(targets[0].tolist()):
        if y == IGNORE:
            continue
        zs = [v / temperature for v in s[0, i].tolist()]
        zt = [v / temperature for v in t[0, i].tolist()]
        ps = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
        pt = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        p, q = (pt, ps) if direction == "forward" else (ps, pt)
        expected += sum(a * math.log(a / b) for a, b in zip(p, q)) * temperature**2
    assert int(count) == 5
    assert float(total) == pytest.approx(expected, rel=1e-6)
    # Ignored positions carry no weight: garbage there changes nothing.
    t2 = t.clone()
    t2[0, 2] = 1e4
    t2[0, 6] = -1e4
    assert float(kl_sum(s, t2, targets, temperature=temperature, direction=direction)[0]) == pytest.approx(float(total))


def test_forward_and_reverse_kl_differ_and_vanish_for_equal_logits():
    s, t, targets = _fixed_batch()
    f = float(kl_sum(s, t, targets, direction="forward")[0])
    r = float(kl_sum(s, t, targets, direction="reverse")[0])
    assert f > 0 and r > 0 and abs(f - r) > 1e-3
    assert float(kl_sum(s, s, targets)[0]) == pytest.approx(0.0, abs=1e-9)


def _naive_kl(s, t, keep, T, direction):
    log_s = torch.log_softmax(s[keep].double() / T, -1)
    log_t = torch.log_softmax(t[keep].double() / T, -1)
    p, log_p, log_q = (log_t.exp(), log_t, log_s) if direction == "forward" else (log_s.exp(), log_s, log_t)
    return (p * (log_p - log_q)).sum() * T**2


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_losses_gradients_match_autograd_of_the_plain_formulas(direction, monkeypatch):
    """The losses compute their gradient chunk by chunk in the forward pass; it must equal autograd through the plain
    formulas, with chunks that do not divide the rows and ignored positions in between."""
    from hybridize.train import losses

    monkeypatch.setattr(losses, "CHUNK_ROWS", 3)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    s = torch.randn(2, 9, 13, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 9, 13, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 13, (2, 9), generator=g)
    targets[0, 4] = targets[1, 0] = targets[1, 8] = IGNORE
    keep = (targets != IGNORE).reshape(-1)
    flat_s, flat_t = s.reshape(-1, 13), t.reshape(-1, 13)
    for T in (1.0, 2.0):
        a = s.clone().requires_grad_(True)
        kl_sum(a, t, targets, temperature=T, direction=direction)[0].backward()
        b = flat_s.clone().requires_grad_(True)
        _naive_kl(b, flat_t, keep, T, direction).backward()
        torch.testing.assert_close(a.grad.reshape(-1, 13), b.grad, rtol=1e-9, atol=1e-12)
    a = s.clone().requires_grad_(True)
    cross_entropy_sum(a, targets)[0].backward()
    b = flat_s.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(b[keep], targets.reshape(-1)[keep], reduction="sum").backward()
    torch.testing.assert_close(a.grad.reshape(-1, 13), b.grad, rtol=1e-9, atol=1e-12)
    # bf16 logits (autocast): float32 arithmetic inside, a bf16 gradient of the same values
    a = s.to(torch.bfloat16).requires_grad_(True)
    kl_sum(a, t.to(torch.bfloat16), targets, temperature=2.0, direction=direction)[0].backward()
    b = s.to(torch.bfloat16).double().reshape(-1, 13).requires_grad_(True)
    _naive_kl(b, t.to(torch.bfloat16).double().reshape(-1, 13), keep, 2.0, direction).backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(a.grad.double().reshape(-1, 13), b.grad, rtol=2e-2, atol=2e-3)


def test_hidden_mse_matches_explicit_mean():
    g = torch.Generator().manual_seed(5)
    hs = tuple(torch.randn(1, 4, 3, generator=g) for _ in range(4))  # embeddings + 3 layers
    ht = tuple(torch.randn(1, 4, 3, generator=g) for _ in range(4))
    total, count = hidden_mse_sum(hs, ht, [0, 2])
    a = hs[1].numpy().astype(np.float64) - ht[1].numpy()
    b = hs[3].numpy().astype(np.float64) - ht[3].numpy()
    expected = ((a**2).mean() + (b**2).mean()) / 2 * 4  # mean over layers and units, summed over 4 tokens
    assert int(count) == 4
    assert float(total) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Packing: the same loss as running each document alone
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridize.convert.build import build_hybrid

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, rope_theta=10000.0)
    teacher = LlamaForCausalLM(cfg).eval()
    student = build_hybrid(teacher, ["linear_attention", "full_attention"] * 2, hype=True, output_gates=True)
    for p in student.parameters():
        p.data = p.data.clone()
    with torch.no_grad():  # move the student away from the teacher so every loss is non-trivial
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return student.float().eval(), teacher


def test_packed_documents_give_the_same_losses_as_separate_runs(tiny_pair):
    student, teacher = tiny_pair
    rng = np.random.default_rng(1)
    # Two packed sequences of 24 tokens: segments [0, 5, 17) + [17, 24) and [0, 9) + [9, 24) (a micro-batch of 2,
    # flattened to one row with cu_seqlens).
    seqs = [(rng.integers(0, 97, 24).astype(np.int32), np.array([0, 5, 17])),
            (rng.integers(0, 97, 24).astype(np.int32), np.array([0, 9]))]
    spec = LossSpec(hidden_mse=0.7, kl=1.0, ce=0.3, temperature=1.5, kl_direction="reverse")
    batch = make_batch(seqs)
    assert batch["cu_seqlens"].tolist() == [0, 5, 17, 24, 33, 48]
    assert batch["counted"] == int((batch["targets"] != IGNORE).sum()) == 48 - 5  # one target fewer per segment
    assert batch["position_ids"][0, 17:26].tolist() == list(range(7)) + [0, 1]
    layers = [0, 1, 2, 3]
    with torch.no_grad():
        parts = loss_parts(student, teacher, batch, spec, layers)
        packed = float(weighted(parts, part_counts(batch, spec), spec))

        sums = {"hidden_mse": 0.0, "kl": 0.0, "ce": 0.0}
        counts = {"hidden_mse": 0, "kl": 0, "ce": 0}
        for tokens, starts in seqs:
            bounds = list(starts) + [len(tokens)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                ids = torch.from_numpy(tokens[a:b].astype(np.int64))[None]
                so = student(input_ids=ids, output_hidden_states=True, use_cache=False)
                to = teacher(input_ids=ids, output_hidden_states=True, use_cache=False)
                targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], dim=1)
                h, n = hidden_mse_sum(so.hidden_states, to.hidden_states, layers)
                sums["hidden_mse"] += float(h)
                counts["hidden_mse"] += int(n)
                k, n = kl_sum(so.logits, to.logits, targets, temperature=1.5, direction="reverse")
                sums["kl"] += float(k)
                counts["kl"] += int(n)
                c, n = cross_entropy_sum(so.logits, targets)
                sums["ce"] += float(c)
                counts["ce"] += int(n)
    separate = sum(getattr(spec, k) * sums[k] / counts[k] for k in sums)
    for k in sums:
        assert float(parts[k][0]) == pytest.approx(sums[k], rel=1e-4), k
    assert packed == pytest.approx(separate, rel=1e-4)
    # and packing without boundaries would differ (the check has teeth)
    flat = dict(batch, cu_seqlens=torch.tensor([0, 48], dtype=torch.int32),
                position_ids=torch.arange(48)[None])
    with torch.no_grad():
        leaky = loss_parts(student, teacher, flat, spec, layers)
    assert abs(float(leaky["ce"][0]) - sums["ce"]) > 1e-3


def test_kl_max_position_takes_the_teacher_only_at_earlier_positions(tiny_pair):
    """loss.kl_max_position: the KL term sums, and counts, only the positions below it in each segment (the same
    sums as the segments run alone and cut there); the cross-entropy still reads every position."""
    student, teacher = tiny_pair
    rng = np.random.default_rng(2)
    seqs = [(rng.integers(0, 97, 24).astype(np.int32), np.array([0, 14])),
            (rng.integers(0, 97, 24).astype(np.int32), np.array([0]))]
    cut = 9
    spec = LossSpec(kl=1.0, ce=0.5, kl_max_position=cut)
    batch = make_batch(seqs, kl_max_position=cut)
    # segments of 14, 10 and 24 tokens: positions 0-8 of each have a target (position 9 of the 10-token one is its
    # last token, which predicts nothing)
    assert batch["counted_kl"] == 3 * cut and batch["counted"] == 48 - 3
    assert part_counts(batch, spec) == {"kl": 3 * cut, "ce": 45}
    with torch.no_grad():
        parts = loss_parts(student, teacher, batch, spec, [])
        kl_total, n_kl, ce_total = 0.0, 0, 0.0
        for tokens, starts in seqs:
            bounds = list(starts) + [len(tokens)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                ids = torch.from_numpy(tokens[a:b].astype(np.int64))[None]
                so, to = student(input_ids=ids, use_cache=False), teacher(input_ids=ids, use_cache=False)
                targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], dim=1)
                early = targets.masked_fill(torch.arange(b - a)[None] >= cut, IGNORE)
                k, n = kl_sum(so.logits, to.logits, early)
                kl_total, n_kl = kl_total + float(k), n_kl + int(n)
                ce_total += float(cross_entropy_sum(so.logits, targets)[0])
        everywhere = loss_parts(student, teacher, batch, LossSpec(kl=1.0, ce=0.5), [])
    assert int(parts["kl"][1]) == n_kl == 3 * cut
    assert float(parts["kl"][0]) == pytest.approx(kl_total, rel=1e-4)
    assert float(parts["ce"][0]) == pytest.approx(ce_total, rel=1e-4)
    assert float(everywhere["kl"][0]) > float(parts["kl"][0]) * 1.2  # the later positions did count before


def test_joined_documents_give_the_losses_of_whole_rows(tiny_pair):
    """With join_documents each sequence is one segment: the losses equal running each row whole through both models
    (positions 0..T-1, targets across the documents' boundaries), on the plain batched path (no cu_seqlens), and
    differ from the same rows with their documents kept apart."""
    student, teacher = tiny_pair
    rng = np.random.default_rng(5)
    seqs = [(rng.integers(0, 97, 24).astype(np.int32), np.array([0, 5, 17])),
            (rng.integers(0, 97, 24).astype(np.int32), np.array([0, 9]))]
    batch = make_batch(seqs, join_documents=True)
    assert batch["cu_seqlens"] is None and batch["rows"] == 2
    assert batch["position_ids"][0].tolist() == list(range(24)) * 2
    assert batch["targets"][0, 16].item() == int(seqs[0][0][17])  # across the boundary at 17
    assert batch["targets"][0, 23].item() == IGNORE and batch["targets"][0, 47].item() == IGNORE
    spec = LossSpec(hidden_mse=0.7, kl=1.0, ce=0.3)
    layers = [0, 1, 2, 3]
    with torch.no_grad():
        parts = loss_parts(student, teacher, batch, spec, layers)
        sums = {"hidden_mse": 0.0, "kl": 0.0, "ce": 0.0}
        for tokens, _ in seqs:
            ids = torch.from_numpy(tokens.astype(np.int64))[None]
            so = student(input_ids=ids, output_hidden_states=True, use_cache=False)
            to = teacher(input_ids=ids, output_hidden_states=True, use_cache=False)
            targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], dim=1)
            sums["hidden_mse"] += float(hidden_mse_sum(so.hidden_states, to.hidden_states, layers)[0])
            sums["kl"] += float(kl_sum(so.logits, to.logits, targets)[0])
            sums["ce"] += float(cross_entropy_sum(so.logits, targets)[0])
        apart = loss_parts(student, teacher, make_batch(seqs), spec, layers)
    for k in sums:
        assert float(parts[k][0]) == pytest.approx(sums[k], rel=1e-4), k
    assert abs(float(apart["ce"][0]) - sums["ce"]) > 1e-3
    # a separator replaces the end of each document followed by another, in the inputs and the targets
    sep = make_batch(seqs, join_documents=True, separator=96)
    assert [i for i in range(48) if sep["input_ids"][0, i] != batch["input_ids"][0, i]] == [4, 16, 32]
    assert (sep["input_ids"][0, [4, 16, 32]] == 96).all() and sep["targets"][0, 3].item() == 96
    assert int(seqs[0][0][4]) != 96  # the caller's tokens are left as they were
    # unequal lengths cannot be rows: one segment per sequence through cu_seqlens instead
    uneven = make_batch([seqs[0], (seqs[1][0][:17], np.array([0, 9]))], join_documents=True)
    assert uneven["rows"] == 1 and uneven["cu_seqlens"].tolist() == [0, 24, 41]


def test_joined_rows_feed_each_layer_the_teachers_input(tiny_pair):
    """The layerwise align loss (teacher inputs) on joined rows: the teacher's flat hidden states are reshaped to the
    student's rows, and two rows give the sum of the rows alone."""
    student, teacher = tiny_pair
    rng = np.random.default_rng(6)
    seqs = [(rng.integers(0, 97, 20).astype(np.int32), np.array([0, 8])) for _ in range(2)]
    spec = LossSpec(hidden_mse=1.0, hidden_inputs="teacher_inputs")
    with torch.no_grad():
        both = float(loss_parts(student, teacher, make_batch(seqs, join_documents=True), spec, [0, 1, 2, 3])
                     ["hidden_mse"][0])
        alone = sum(float(loss_parts(student, teacher, make_batch([x], join_documents=True), spec, [0, 1, 2, 3])
                          ["hidden_mse"][0]) for x in seqs)
    assert both == pytest.approx(alone, rel=1e-5) and both > 0


def test_teacher_inputs_aligns_each_layer_on_its_own(tiny_pair):
    """Fed the teacher's inputs, a sparse layer converted with RoPE kept (hype off) and no new gates computes exactly
    the teacher's layer, so its layerwise error is ~0, while end to end it inherits the Lightning layers' error."""
    from hybridize.convert.build import build_hybrid

    _, teacher = tiny_pair
    student = build_hybrid(teacher, ["linear_attention", "full_attention"] * 2, hype=False, output_gates=False)
    for p in student.parameters():
        p.data = p.data.clone()
    rng = np.random.default_rng(2)
    batch = make_batch([(rng.integers(0, 97, 20).astype(np.int32), np.array([0, 8]))])
    layerwise = LossSpec(hidden_mse=1.0, hidden_inputs="teacher_inputs")
    with torch.no_grad():
        for layer in range(4):
            lw = float(loss_parts(student, teacher, batch, layerwise, [layer])["hidden_mse"][0])
            e2e = float(loss_parts(student, teacher, batch, LossSpec(hidden_mse=1.0), [layer])["hidden_mse"][0])
            if layer % 2:  # sparse: the teacher's own attention
                assert lw < 1e-9 and e2e > 1e-4, (layer, lw, e2e)
            else:  # Lightning: a different mixer, a real error
                assert lw > 1e-4, (layer, lw)
    assert all(not layer._forward_pre_hooks for layer in student.model.layers)  # the swap ends with the forward


def test_hidden_layers_choice_picks_the_layers_of_that_kind(tiny_pair):
    """`loss.hidden_layers: sparse` aligns the sparse layers alone: with RoPE kept and no gates they are the teacher's
    own attention, so their layerwise error is ~0 while the Lightning layers' is not; `all` averages both."""
    from hybridize.convert.build import build_hybrid
    from hybridize.train.trainer import hidden_loss_layers

    _, teacher = tiny_pair
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    student = build_hybrid(teacher, types, hype=False, output_gates=False)
    rng = np.random.default_rng(3)
    batch = make_batch([(rng.integers(0, 97, 24).astype(np.int32), np.array([0, 10]))])
    spec = LossSpec(hidden_mse=1.0, hidden_inputs="teacher_inputs")
    assert hidden_loss_layers(types, "sparse") == [1] and hidden_loss_layers(types, "lightning") == [0, 2, 3]
    with torch.no_grad():
        loss = {which: float(loss_parts(student, teacher, batch, spec, hidden_loss_layers(types, which))
                             ["hidden_mse"][0]) for which in ("sparse", "lightning", "all")}
    assert loss["sparse"] < 1e-9 < 1e-4 < loss["lightning"], loss
    assert loss["all"] == pytest.approx((loss["sparse"] + 3 * loss["lightning"]) / 4, rel=1e-5)


def test_heldout_evaluation_runs_the_plain_code_and_restores_the_fusion_switch(tiny_pair):
    """The in-run held-out evaluation runs the student with the inference-only fused pieces switched off (the code the
    training steps run, and no compilation inside a training run), gives the cross-entropy of that model, and leaves
    the switch (which the exported model keeps) as it was."""
    from accelerate import Accelerator

    from hybridize.train.trainer import heldout_loss

    student, _ = tiny_pair
    student.train()
    acc = Accelerator(cpu=True)
    seen = []
    hook = student.register_forward_pre_hook(lambda m, a: seen.append(m.config.fused_elementwise))
    rng = np.random.default_rng(3)
    seqs = [(rng.integers(3, 97, 40).astype(np.int32), np.array([0, 17])) for _ in range(3)]
    try:
        got = heldout_loss(acc, student, seqs, micro=2)
    finally:
        hook.remove()
    assert seen == [False, False] and student.config.fused_elementwise is True and student.training
    student.eval()
    batch = make_batch(seqs, "cpu")
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         cu_seqlens=batch["cu_seqlens"], use_cache=False).logits
    t = batch["targets"]
    keep = t != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep].double(), t[keep]).item()
    assert got["heldout_loss"] == pytest.approx(expected, rel=1e-5)
    assert got["heldout_tokens"] == int(keep.sum())


def test_teacher_runs_on_the_batch_rows_and_matches_the_flat_row(tiny_pair):
    """The teacher runs on the B equal-length rows of a batch, not on the flattened row (whose block-diagonal mask and
    attention cover (B*T)^2 entries); its logits and hidden states equal those of the flattened call, and a batch of
    unequal sequences keeps the flat call."""
    from hybridize.train.trainer import teacher_outputs

    _, teacher = tiny_pair
    rng = np.random.default_rng(4)
    seqs = [(rng.integers(0, 97, 24).astype(np.int32), np.array([0, 5, 17])),
            (rng.integers(0, 97, 24).astype(np.int32), np.array([0])),
            (rng.integers(0, 97, 24).astype(np.int32), np.array([0, 23]))]
    batch = make_batch(seqs)
    assert batch["rows"] == 3
    by_rows = teacher_outputs(teacher, batch, need_hidden=True)
    flat = teacher_outputs(teacher, dict(batch, rows=1), need_hidden=True)
    assert by_rows.logits.shape == flat.logits.shape == (1, 72, teacher.config.vocab_size)
    torch.testing.assert_close(by_rows.logits, flat.logits, rtol=1e-4, atol=1e-5)
    assert len(by_rows.hidden_states) == len(flat.hidden_states) == teacher.config.num_hidden_layers + 1
    for a, b in zip(by_rows.hidden_states, flat.hidden_states):
        assert a.shape == b.shape == (1, 72, teacher.config.hidden_size)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert teacher_outputs(teacher, batch, need_hidden=False).hidden_states is None
    assert make_batch([seqs[0], (seqs[1][0][:17], np.array([0]))])["rows"] == 1


def test_align_loss_skips_the_vocabulary_projection_and_keeps_its_value(tiny_pair):
    """A hidden-MSE-only loss projects one position per row onto the vocabulary in both models (no loss reads the
    logits) and gives the loss of the full forward; a KL loss still projects every position."""
    from hybridize.convert.build import build_hybrid
    from hybridize.train.losses import hidden_mse_sum

    _, teacher = tiny_pair
    student = build_hybrid(teacher, ["linear_attention", "full_attention"] * 2)
    rng = np.random.default_rng(5)
    batch = make_batch([(rng.integers(0, 97, 21).astype(np.int32), np.array([0, 9]))])
    projected = {"student": [], "teacher": []}
    hooks = [m.lm_head.register_forward_hook(lambda mod, args, out, k=k: projected[k].append(args[0].shape[1]))
             for k, m in (("student", student), ("teacher", teacher))]
    layers = list(range(4))
    try:
        with torch.no_grad():
            got = loss_parts(student, teacher, batch, LossSpec(hidden_mse=1.0), layers)["hidden_mse"][0]
            assert projected == {"student": [1], "teacher": [1]}
            s = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        cu_seqlens=batch["cu_seqlens"], output_hidden_states=True, use_cache=False)
            t = teacher(input_ids=batch["input_ids"], position_ids=batch["position_ids"], output_hidden_states=True,
                        use_cache=False)
            expected = hidden_mse_sum(s.hidden_states, t.hidden_states, layers)[0]
            for k in projected:
                projected[k].clear()
            loss_parts(student, teacher, batch, LossSpec(kl=1.0), layers)
            assert projected == {"student": [21], "teacher": [21]}
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_mixer_alignment_compares_the_token_mixers_alone_and_skips_the_mlps(tiny_pair):
    """hidden_at: mixer compares each layer's token-mixer output, every layer fed the teacher's input (HALO's stage
    1): the loss is the mean over layers of the per-token squared error of those outputs, it does not depend on the
    student's MLPs, whose blocks do not run, and afterwards the MLPs work again."""
    from hybridize.convert.build import build_hybrid
    from hybridize.train.trainer import teacher_inputs

    _, teacher = tiny_pair
    student = build_hybrid(teacher, ["linear_attention", "full_attention"] * 2)
    for p in student.parameters():  # build_hybrid reuses the source's tensors; the MLPs are changed below
        p.data = p.data.clone()
    rng = np.random.default_rng(6)
    batch = make_batch([(rng.integers(0, 97, 23).astype(np.int32), np.array([0, 11]))])
    spec = LossSpec(hidden_mse=1.0, hidden_inputs="teacher_inputs", hidden_at="mixer")
    layers = list(range(4))
    kw = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)

    def attention_outputs(model, call):
        outs = []
        hooks = [layer.self_attn.register_forward_hook(
            lambda mod, args, out: outs.append(out[0] if isinstance(out, tuple) else out))
            for layer in model.model.layers]
        try:
            call()
        finally:
            for h in hooks:
                h.remove()
        return [o.reshape(-1, o.shape[-1]) for o in outs]

    mlp_sizes = []
    sizes = [layer.mlp.register_forward_hook(lambda mod, args, out: mlp_sizes.append(out.numel()))
             for layer in student.model.layers]
    with torch.no_grad():
        got = loss_parts(student, teacher, batch, spec, layers)["hidden_mse"][0]
        skipped, mlp_sizes[:] = list(mlp_sizes), []
        t_hidden = teacher(**kw, output_hidden_states=True).hidden_states
        t_mix = attention_outputs(teacher, lambda: teacher(**kw))

        def student_call():
            with teacher_inputs(student, [h.reshape(1, -1, h.shape[-1]) for h in t_hidden]):
                student(**kw, cu_seqlens=batch["cu_seqlens"])

        s_mix = attention_outputs(student, student_call)
    for h in sizes:
        h.remove()
    assert skipped == [1] * 4 and mlp_sizes == [23 * teacher.config.hidden_size] * 4  # skipped, then back
    expected = sum(((s - t) ** 2).mean(-1).sum() for s, t in zip(s_mix, t_mix)) / 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for layer in student.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
        again = loss_parts(student, teacher, batch, spec, layers)["hidden_mse"][0]
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    student.zero_grad()
    loss_parts(student, teacher, batch, spec, layers)["hidden_mse"][0].backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".self_attn." in n for n in grads)  # the mixers and the norm before them; nothing after them
    assert not [n for n in grads if ".mlp." in n or "post_attention" in n or "embed" in n or n.startswith("model.norm")]


def test_a_stage_with_kl_max_position_trains_its_kl_on_the_early_positions_alone(tmp_path):
    """Through the trainer: the same run with the teacher's KL cut at position 16 of 64-token rows logs another KL
    from its first step on (the same data, seed and weights) and the same cross-entropy (which reads every position);
    the per-position sums themselves are checked against separate runs above."""
    import test_train_support as S

    from hybridize.train.recipe import recipe_from_dict
    from hybridize.train.trainer import train

    docs = S.write_documents(tmp_path / "docs", count=3)
    src = S.make_tiny_source(tmp_path / "src", docs)
    logs = {}
    for name, cut in (("all", None), ("cut", 16)):
        spec = S.tiny_recipe(src, docs, tmp_path / name, tmp_path / "cache")
        spec["stages"] = spec["stages"][1:]  # distillation alone: the converted model is the same for both
        spec["stages"][0]["loss"]["kl_max_position"] = cut
        result = train(recipe_from_dict(spec))
        logs[name] = [h for h in result.history if h["stage"] == "distil"]
    first_all, first_cut = logs["all"][0], logs["cut"][0]
    assert first_all["ce"] == pytest.approx(first_cut["ce"], rel=1e-5)  # the cross-entropy reads every position
    assert first_all["kl"] != pytest.approx(first_cut["kl"], rel=1e-3)
    assert all(math.isfinite(h["kl"]) for h in logs["cut"])
