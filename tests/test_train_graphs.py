"""`cuda_graphs` on a stage: the student's forward and backward replayed from CUDA graphs. The recipe refuses it where
a graph cannot replay (packed documents, hidden-state losses), a run refuses it without one CUDA process, and on a GPU
the graphed student gives the eager student's logits and gradients step after step, falling back to the eager model
for any other shape."""

from __future__ import annotations

import pytest
import torch

import test_train_support as S
from hybridize.train.recipe import RecipeError, recipe_from_dict, run_fingerprint
from hybridize.train.trainer import train


def _graphed_distil(tmp_path, **stage):
    docs = S.write_documents(tmp_path / "docs")
    src = S.make_tiny_source(tmp_path / "src", docs)
    recipe = S.tiny_recipe(src, docs, tmp_path / "out", tmp_path / "cache")
    recipe["stages"][1].update({"join_documents": True, "cuda_graphs": True, "gradient_checkpointing": False,
                                **stage})
    return recipe


def test_recipe_refuses_graphs_where_a_batch_can_change_shape_or_needs_hidden_states(tmp_path):
    recipe = _graphed_distil(tmp_path, join_documents=False)
    with pytest.raises(RecipeError, match=r"stages\[1\]\.cuda_graphs: .*join_documents: true"):
        recipe_from_dict(recipe)
    recipe = _graphed_distil(tmp_path)
    recipe["stages"][1]["loss"]["hidden_mse"] = 1.0
    with pytest.raises(RecipeError, match=r"stages\[1\]\.cuda_graphs: .*hidden_mse"):
        recipe_from_dict(recipe)
    on, off = _graphed_distil(tmp_path), _graphed_distil(tmp_path, cuda_graphs=False)
    assert run_fingerprint(recipe_from_dict(on)) == run_fingerprint(recipe_from_dict(off))  # time only: resumable


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_a_run_without_a_gpu_refuses_graphs_naming_the_field(tmp_path):
    recipe = recipe_from_dict(_graphed_distil(tmp_path))
    with pytest.raises(ValueError, match=r"stages\[1\]\.cuda_graphs: stage 'distil' runs on cpu"):
        train(recipe)
    assert not (tmp_path / "out").exists()  # nothing left behind by a run that never trained


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [0, 48])  # 48: the Lightning layers' softmax window, as recipes/retention.yaml's
def test_gpu_graphed_student_matches_the_eager_one_over_steps(window):
    from helpers import gpu_llama
    from hybridize.convert.build import build_hybrid
    from hybridize.train.graphs import GraphedStudent
    from hybridize.train.losses import kl_sum

    def make():
        return build_hybrid(gpu_llama(), ["lightning", "sparse", "lightning", "sparse"], sparse_dense_len=64,
                            sparse_topk=4, sparse_init_blocks=1, sparse_local_blocks=2,
                            lightning_window=window).cuda().float().train()

    eager, graphed = make(), make()
    graphed.load_state_dict(eager.state_dict())
    student = GraphedStudent(graphed, graphed, torch.bfloat16)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    g = torch.Generator().manual_seed(0)
    # 320 tokens (5 blocks, top 4): past the sparse layers' dense length, so the graphs record block selection
    pos = torch.arange(320, device="cuda").expand(3, -1)  # one row's storage for all, as the trainer's positions
    for step in range(3):
        ids = torch.randint(3, 97, (3, 320), generator=g).cuda()
        teacher = torch.randn(3, 320, 97, generator=g).cuda()
        targets = torch.randint(0, 97, (3, 320), generator=g).cuda()
        losses = []
        for model, call, opt in ((eager, None, opts[0]), (graphed, student, opts[1])):
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                logits = (call or model)(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=0).logits
            loss, _ = kl_sum(logits, teacher, targets)
            loss.backward()
            losses.append(float(loss))
            grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad(set_to_none=True)
            if call is None:
                eager_grads = grads
        assert losses[1] == pytest.approx(losses[0], rel=1e-2), step
        for a, b in zip(eager_grads, grads):
            assert (a is None) == (b is None), step
            if a is not None:
                assert (a - b).abs().max() <= 3e-2 * a.abs().max() + 1e-6, step
    assert student.graphed is not None and student.shape == (3, 320)
    other = student(input_ids=ids[:2], position_ids=pos[:2], use_cache=False, logits_to_keep=0)  # another shape
    assert other.logits.shape[:2] == (2, 320)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [0, 16])
def test_gpu_a_run_with_a_graphed_stage_trains_as_the_eager_run(tmp_path, window):
    """The whole trainer, twice from the same seed: the distillation stage with and without `cuda_graphs`, with and
    without the Lightning layers' softmax window. The graphed run's losses follow the eager run's step by step and it
    exports a model."""
    runs = {}
    for name, graphs in (("eager", False), ("graphed", True)):
        spec = _graphed_distil(tmp_path / name, cuda_graphs=graphs)
        spec["model"]["lightning_window"] = window
        result = train(recipe_from_dict(spec))
        runs[name] = [(h["stage"], h["loss"]) for h in result.history]
        assert result.model_dir is not None and (result.model_dir / "config.json").is_file()
    assert [s for s, _ in runs["graphed"]] == [s for s, _ in runs["eager"]]
    for (stage, a), (_, b) in zip(runs["eager"], runs["graphed"]):
        assert b == pytest.approx(a, rel=2e-3, abs=1e-4), stage
