"""Training benchmarks for `hybridize train` (issue 8), one GPU.

    python bench/train_quality.py throughput --out OUT [--shape smollm2 llama3-1b] [--lengths 2048 8192 32768]
        Training throughput (tokens/s, fwd + bwd + AdamW, bf16 autocast) of a SmolLM2-135M-shaped dense Llama (random
        weights, SDPA) and its 1:3 hybrid, at 2K and 8K tokens per sequence, 16K tokens per step (at least one
        sequence); `--shape llama3-1b` adds the Llama-3.2-1B shape, `--loss-chunk N` computes the loss N tokens at a
        time (lm_head recomputed in backward) so that long sequences of a 128K vocabulary fit.

    python bench/train_quality.py prepare --recipe recipes/retention.yaml --methods sala,block_influence --out OUT
        The recipe's teacher-written corpus and the layer scores of each placement method, cached once in the
        recipe's data.cache_dir, so that several quality runs started together do not each compute them.

    python bench/train_quality.py quality --recipe recipes/retention.yaml --train-seconds 600 [--save-untrained DIR] \
        [--no-retention] [--set KEY=VALUE ...] --out OUT
        `train(recipe)` with step counts calibrated to fill --train-seconds, then the retention report
        (hybridize.eval.retention: perplexity on held-out text from domains no recipe trains on, retrieval by length,
        factual probes, agreement with the source) of the source, the trained hybrid loaded from its exported folder
        as a user loads it, and with --save-untrained the conversion before training. The teacher, the conversion and
        the student after each stage are also measured on the report's held-out sources (its 512 and 2K windows, in
        the run's precision) inside the run, so one run shows what each stage does out of domain (quality.json,
        heldout_perplexity_by_stage; the time is not counted as training).

    python bench/train_quality.py retention --model source=default --model NAME=FOLDER ... --out OUT
        The retention report of the models given (one process, one model at a time; the source is the reference).

    python bench/train_quality.py profile --source SmolLM2.gguf --texts DIR [--micro N]
        Where one micro-batch of each stage spends its time: teacher forward, student fwd + bwd, the stage's loss
        fwd + bwd, and a torch.profiler table of the last.

Each prints a short table last and writes JSON beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from portable import without_machine_paths  # bench/portable.py (the script's folder is on sys.path)


# ---------------------------------------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------------------------------------
def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                       rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


def llama3_1b_config():
    """Llama-3.2-1B's shape (its llama3 RoPE scaling left out: no effect on speed)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)


THROUGHPUT_SHAPES = {"smollm2": smollm2_config, "llama3-1b": llama3_1b_config}


def _chunk_loss(head, hidden, targets):
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _training_loss(model, ids, loss_chunk: int, packed: dict | None = None):
    """Next-token cross-entropy; with loss_chunk, the logits of loss_chunk tokens at a time, recomputed in backward
    (never the whole (tokens, vocab) matrix). `packed`: position_ids and cu_seqlens of packed documents (the hybrid)."""
    packed = packed or {}
    if not loss_chunk:
        out = model(input_ids=ids, use_cache=False, **packed)
        return torch.nn.functional.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
    from torch.utils.checkpoint import checkpoint

    hidden = model.model(input_ids=ids, use_cache=False, **packed).last_hidden_state[:, :-1]
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
    total = sum(checkpoint(_chunk_loss, model.lm_head, hidden[s:s + loss_chunk], targets[s:s + loss_chunk],
                           use_reentrant=False) for s in range(0, targets.numel(), loss_chunk))
    return total / targets.numel()


def training_batch(model, seq_len: int, tokens_per_step: int, document_tokens: int = 0, device: str = "cuda"):
    """Random token ids of tokens_per_step // seq_len rows of seq_len, and the keywords that pack them: with
    `document_tokens`, a hybrid reads them as the trainer hands them over, one flat row of documents of that many
    tokens (cu_seqlens, positions restarting at each); the dense model reads the rows, as the trainer's teacher does."""
    from hybridize.train.data import make_batch

    B = max(1, tokens_per_step // seq_len)
    ids = torch.randint(0, model.config.vocab_size, (B, seq_len), device=device)
    if not document_tokens or getattr(model.config, "model_type", None) != "hybridize":
        return ids, {}
    starts = np.arange(0, seq_len, document_tokens)
    batch = make_batch([(row, starts) for row in ids.cpu().numpy()], device)
    return batch["input_ids"], {"position_ids": batch["position_ids"], "cu_seqlens": batch["cu_seqlens"]}


def _graphed_loss(student, ids):
    """The trainer's path with `cuda_graphs`: the logits from the graphed forward, the loss kernel's cross-entropy."""
    from hybridize.train.losses import cross_entropy_sum

    pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    logits = student(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=0).logits
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    total, n = cross_entropy_sum(logits, targets)
    return total / n


def time_training(model, seq_len: int, tokens_per_step: int, steps: int = 6, warmup: int = 2, bf16: bool = True,
                  loss_chunk: int = 0, document_tokens: int = 0, graphs: bool = False) -> dict:
    """`graphs`: forward and backward replayed from CUDA graphs (hybridize/train/graphs.py; rows, no documents),
    the loss by the trainer's cross-entropy; recorded in the first warm-up step."""
    model = model.to("cuda").float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids, packed = training_batch(model, seq_len, tokens_per_step, 0 if graphs else document_tokens)
    student = None
    if graphs:
        from hybridize.train.graphs import GraphedStudent

        student = GraphedStudent(model, model, torch.bfloat16 if bf16 else None)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        if student is not None:  # its own autocast, inside the graph
            loss = _graphed_loss(student, ids)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = _training_loss(model, ids, loss_chunk, packed)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    n = ids.numel()
    return {"seq_len": seq_len, "tokens_per_step": n, "step_s": med, "tokens_per_s": n / med,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "document_tokens": document_tokens or None}


def compile_regions(model, whole_layers: bool) -> str:
    """torch.compile each decoder layer (whole_layers) or only its MLP and two norms, in place; returns what was
    compiled. The hybrid's token mixers call Triton kernels through autograd Functions, which the regional variant
    leaves outside the compiled graphs."""
    n = 0
    for layer in model.model.layers:
        if whole_layers:
            layer.compile()
            n += 1
            continue
        for m in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
            m.compile()
            n += 1
    return f"{n} {'layers' if whole_layers else 'MLPs and norms'}"


def profile_training_step(model, seq_len: int, tokens_per_step: int, loss_chunk: int, rows: int = 12,
                          document_tokens: int = 0) -> dict:
    """One training step under torch.profiler (after time_training warmed it up): wall against the GPU's busy time
    (the share the host's launching leaves idle), kernel launches, and the ops that take the most device time."""
    from torch.profiler import ProfilerActivity, profile

    ids, packed = training_batch(model, seq_len, tokens_per_step, document_tokens)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = _training_loss(model, ids, loss_chunk, packed)
        loss.backward()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    # the kernels' own spans: the ops' device totals count the same kernels again (2026-12-02: busy > wall)
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0) or 0, reverse=True)[:rows]
    return {"wall_s": wall, "device_busy_s": busy, "kernels": len(kernels),
            "top": [(e.key[:60], e.count, (e.self_device_time_total or 0) / 1e3) for e in top],
            "host_top": _host_time(model, ids, loss_chunk, packed, rows)}


def _host_time(model, ids, loss_chunk: int, packed, rows: int) -> list:
    """Where the host spends one more step (Python functions by their own time, cProfile): a launch-bound step's
    wall is the host's time, so these are what to trim. [(function, calls, own ms)]."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _training_loss(model, ids, loss_chunk, packed)
    loss.backward()
    torch.cuda.synchronize()
    prof.disable()
    model.zero_grad(set_to_none=True)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, callers)}
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]
    return [(f"{Path(f).name}:{line}:{name}"[:60], calls, own * 1e3) for (f, line, name), (calls, _, own, _, _) in top]


def cmd_throughput(args) -> int:
    from transformers import LlamaForCausalLM

    from hybridize.convert.build import build_hybrid
    from hybridize.select.placement import layer_types_for

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    from hybridize.arch import ops

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "fp32": args.fp32,
            "document_tokens": args.document_tokens or None,
            "tokens_per_step": args.tokens_per_step, "loss_chunk": args.loss_chunk,
            "kernels": {"lightning_triton": bool(getattr(ops, "_LIGHTNING_TRITON", False)),
                        "sparse_triton": bool(getattr(ops, "_SPARSE_TRITON", False))}}
    for shape in args.shape:
        torch.manual_seed(0)
        cfg = THROUGHPUT_SHAPES[shape]()
        cfg._attn_implementation = "sdpa"
        cfg.max_position_embeddings = max(cfg.max_position_embeddings, max(args.lengths))
        t0 = time.perf_counter()
        dense = LlamaForCausalLM(cfg)  # once per shape: the steps change the weights, not the speed
        models = [("dense", dense)]
        for kv in args.lightning_kv_heads:
            hybrid = build_hybrid(dense, layer_types_for(cfg.num_hidden_layers, "1:3"),  # SmolLM2: 8 of 30 sparse
                                  lightning_kv_heads=kv)
            for p in hybrid.parameters():
                p.data = p.data.clone()
            models.append(("hybrid 1:3" + (" (source K/V)" if kv == "source" else ""), hybrid))
        print(f"{shape}: built in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.cuda_graphs:  # the same models, forward and backward replayed from CUDA graphs
            models += [(f"{name} (graphed)", model) for name, model in models]
        if args.compile:  # after the eager rows: the same models compiled in place
            models += [(f"{name} (compiled)", model) for name, model in models if not name.endswith("(graphed)")]
        for name, model in models:  # every length of a model in a row: compiling in place ends its eager rows
            if name.endswith("(compiled)"):
                print(f"{name}: compiled {compile_regions(model, whole_layers=name.startswith('dense'))}", flush=True)
            for length in args.lengths:
                try:
                    t0 = time.perf_counter()
                    graphs = name.endswith("(graphed)")
                    r = time_training(model, length, args.tokens_per_step, steps=args.steps, bf16=not args.fp32,
                                      loss_chunk=args.loss_chunk, document_tokens=args.document_tokens, graphs=graphs)
                    r["first_steps_s"] = time.perf_counter() - t0  # compilation included
                    if args.profile and not graphs:
                        r["profile"] = profile_training_step(model, length, args.tokens_per_step, args.loss_chunk,
                                                             document_tokens=args.document_tokens)
                except torch.OutOfMemoryError:
                    r = {"seq_len": length, "error": "out of memory"}
                r["model"], r["shape"] = name, shape
                rows.append(r)
                print(json.dumps(r), flush=True)
                (out / "throughput.json").write_text(json.dumps(info, indent=1))  # a run cut short keeps its rows
            model.to("cpu")  # (a compiled model moved between lengths would compile again)
            torch.cuda.empty_cache()
        del dense, hybrid
    (out / "throughput.json").write_text(json.dumps(info, indent=1))
    print(f"\n| shape | model | seq len | tokens/step | step ms | tokens/s | peak GiB |  ({info['device']})")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['model']} | {r['seq_len']} | - | - | {r['error']} | - |")
        else:
            print(f"| {r['shape']} | {r['model']} | {r['seq_len']} | {r['tokens_per_step']} | "
                  f"{1000 * r['step_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} |")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            print(f"\n{r['shape']} {r['model']} {r['seq_len']}: one step profiled: wall {1000 * p['wall_s']:.1f} ms, "
                  f"device busy {1000 * p['device_busy_s']:.1f} ms, {p['kernels']} kernels")
            for key, count, ms in p["top"]:
                print(f"  {ms:8.2f} ms  {count:5d}x  {key}")
            print("  host, one more step (own time by Python function; synchronize is the wait for the GPU):")
            for key, count, ms in p.get("host_top", []):
                print(f"  {ms:8.2f} ms  {count:5d}x  {key}")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Held-out perplexity: one function for both models
# ---------------------------------------------------------------------------------------------------------------------
def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _best_time(fn, model, device: str, bf16: bool, reps: int = 3) -> float:
    """Seconds of fn() under the run's autocast, device synchronised: the best of reps - 1 after a warm-up call
    (gradients accumulate across the calls, as over a step's micro-batches; cleared at the end)."""
    times = []
    try:
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                fn()
            _sync(device)
            times.append(time.perf_counter() - t)
    finally:
        model.zero_grad(set_to_none=True)
    return min(times[1:])


def _micro_batch(model, stage, micro: int, device: str):
    """`micro` copies of one stage-length sequence of token ids (a single document each), as the trainer batches."""
    from hybridize.train.data import make_batch

    ids = np.random.default_rng(0).integers(0, min(1000, model.config.vocab_size), stage.seq_len).astype(np.int32)
    return make_batch([(ids, np.array([0]))] * micro, device, kl_max_position=stage.loss.kl_max_position)


def _stage_loss_backward(model, teacher, stage, batch, student=None) -> None:
    """One forward + backward of the stage's loss on `batch` (the loss the trainer builds); `student`: what the losses
    call instead of the model (its graphed forward)."""
    from hybridize.train.trainer import loss_parts, part_counts, weighted

    parts = loss_parts(student or model, teacher, batch, stage.loss, list(range(model.config.num_hidden_layers)))
    weighted(parts, part_counts(batch, stage.loss), stage.loss).backward()


def _time_micro(model, teacher, stage, micro: int, precision: str, device: str, graphed: bool = False) -> float | None:
    """Seconds for one forward + backward of `micro` sequences of the stage (best of 2 after a warm-up); None on OOM.
    `graphed`: the student replayed from CUDA graphs as the trainer runs a `cuda_graphs` stage (recorded in the
    warm-up call), so that the steps fill the time they will take."""
    student = model
    if graphed and str(device).startswith("cuda"):
        from hybridize.train.graphs import GraphedStudent

        student = GraphedStudent(model, model, torch.bfloat16 if precision == "bf16" else None)
    try:
        batch = _micro_batch(model, stage, micro, device)
        return _best_time(lambda: _stage_loss_backward(model, teacher, stage, batch, student), model, device,
                          precision == "bf16")
    except torch.OutOfMemoryError:
        return None
    finally:
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


def calibrate(recipe, student, teacher, seconds: float, split: list[float], device: str = "cuda",
              micro_factors: tuple[int, ...] = (1,)) -> list[int]:
    """Steps per stage so that stage i takes about split[i] * seconds. With `micro_factors` (e.g. 1, 2, 4) each stage
    also tries micro-batches of that many times the recipe's (up to the sequences per step), keeps the fastest per
    token that fits in memory, and writes it into the stage (the global batch, hence the optimisation, is unchanged)."""
    from hybridize.train.params import select_trainable
    from hybridize.train.plan import plan_stage

    model = copy.deepcopy(student).to(device).train()
    steps = []
    for k, stage in enumerate(recipe.stages):
        if stage.trainable != "lora":  # (LoRA adapters are added by the trainer; time the full model instead)
            select_trainable(model, stage.trainable, f"stages[{k}].trainable")
        per_process = plan_stage(stage, 1).per_process
        best, tried = None, set()
        for f in micro_factors:
            micro = min(stage.micro_batch_size * f, per_process)
            if per_process % micro or micro in tried:
                continue
            tried.add(micro)
            t = _time_micro(model, teacher, stage, micro, recipe.precision, device, graphed=stage.cuda_graphs)
            print(f"calibration: stage {stage.name}: micro-batch {micro}: "
                  + ("out of memory" if t is None else f"{t:.3f} s, {micro * stage.seq_len / t:,.0f} tokens/s"),
                  flush=True)
            if t is not None and (best is None or t / micro < best[0] / best[1]):
                best = (t, micro)
        if best is None:
            raise SystemExit(f"stage {stage.name}: even micro-batch {stage.micro_batch_size} runs out of memory")
        stage.micro_batch_size = best[1]
        step_s = best[0] * (per_process // best[1]) * 1.08  # + optimizer step and logging
        steps.append(max(1, int(split[k] * seconds / step_s)))
        print(f"calibration: stage {stage.name}: micro-batch {best[1]}, {step_s:.3f} s/step -> {steps[-1]} steps",
              flush=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return steps


def _bench_recipe(args, *extra_sets: str):
    """The recipe of a quality/profile run: --recipe with the model from --source, the texts from --texts (both
    data sources), no progress bar, then `extra_sets` and the user's --set overrides."""
    from hybridize.train.recipe import load_recipe

    sets = ([f"model.source={args.source}"] if args.source else []) + [*extra_sets, "logging.progress=false"] \
        + list(args.set)
    if args.texts:
        sets += [f"data.sources[{i}].path={args.texts}" for i in range(args.num_sources)]
    return load_recipe(args.recipe, sets)


def cmd_profile(args) -> int:
    """Where one training micro-batch of each recipe stage spends its time (it found the teacher's (B*T)^2 packed
    mask, bench/results/training.md): the teacher's forward alone, the student's forward + backward alone (mean of
    its logits as the loss), the stage's real loss + backward, and a torch.profiler table of the last
    (device time by op; wall time against device time tells whether the step waits on the host)."""
    from torch.profiler import ProfilerActivity, profile

    from hybridize.train.models import load_models
    from hybridize.train.params import select_trainable
    from hybridize.train.trainer import teacher_outputs

    recipe = _bench_recipe(args)
    student, teacher, _, _ = load_models(recipe, need_teacher=True)
    dev = args.device
    teacher = teacher.to(dev)
    model = student.to(dev).train()
    bf16 = recipe.precision == "bf16"
    for k, stage in enumerate(recipe.stages):
        if stage.trainable != "lora":
            select_trainable(model, stage.trainable, f"stages[{k}].trainable")
        micro = args.micro or stage.micro_batch_size
        batch = _micro_batch(model, stage, micro, dev)
        x = batch["input_ids"]

        def teacher_fwd():  # the trainer's teacher call (on the batch's rows, hidden states where the loss uses them)
            teacher_outputs(teacher, batch, need_hidden=stage.loss.hidden_mse > 0, need_logits=stage.loss.kl > 0)

        def student_only():
            model(input_ids=x).logits.float().mean().backward()

        def real():
            _stage_loss_backward(model, teacher, stage, batch)

        tokens = micro * stage.seq_len
        rows = [(name, _best_time(fn, model, dev, bf16)) for name, fn in
                (("teacher forward", teacher_fwd), ("student fwd+bwd", student_only), ("stage loss fwd+bwd", real))]
        print(f"\nstage {stage.name}: micro-batch {micro} x {stage.seq_len} = {tokens} tokens, precision "
              f"{recipe.precision}, device {dev}")
        print("| part | seconds | tokens/s |\n|---|---|---|")
        for name, t in rows:
            print(f"| {name} | {t:.4f} | {tokens / t:,.0f} |")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
        _sync(dev)
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=bf16):
                real()
            _sync(dev)
        wall = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        key = "self_device_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
        events = prof.key_averages()
        busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e6
        print(f"profiled stage loss fwd+bwd: wall {wall:.4f} s, device busy {busy:.4f} s "
              f"({len(events)} op kinds)")
        print(events.table(sort_by=key, row_limit=args.rows))
    return 0


def cmd_prepare(args) -> int:
    """What every quality run of a recipe would otherwise redo at the same time: the teacher-written corpus and the
    layer scores of each placement method, computed once here into the recipe's cache (data.cache_dir)."""
    import dataclasses

    from hybridize.train.data import build_corpus
    from hybridize.train.plan import note_repetition_cut
    from hybridize.train.models import DTYPES, load_source, sparse_layers_for

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = _bench_recipe(args)
    report: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    t = time.perf_counter()
    source, tok = load_source(recipe.model.source)
    report["load_s"] = time.perf_counter() - t
    for method in args.methods.split(","):
        t = time.perf_counter()
        spec = dataclasses.replace(recipe.model, select=method, layers=None)
        layers = sparse_layers_for(source, spec, tokenizer=tok, cache_dir=recipe.data.cache_dir, progress=False)
        report[f"select_{method}"] = {"layers": layers, "seconds": time.perf_counter() - t}
        print(f"{method}: sparse layers {layers} ({time.perf_counter() - t:.0f} s)", flush=True)
    teacher = source.to(DTYPES[recipe.teacher.dtype]).to(args.device).eval()
    t = time.perf_counter()
    corpus = build_corpus(recipe.data, tok, recipe.seed, teacher=teacher,
                          teacher_key=str(recipe.teacher.source or recipe.model.source))
    report["corpus_s"] = time.perf_counter() - t
    report["train_tokens"] = [int(len(x.ids)) for x in corpus.train]
    report["heldout_tokens"] = 0 if corpus.heldout is None else int(len(corpus.heldout.ids))
    report["repetition_cut"] = corpus.repetition_cut
    print(f"corpus: {report['train_tokens']} training tokens per source, {report['heldout_tokens']} held out, "
          f"{report['corpus_s']:.0f} s", flush=True)
    note_repetition_cut(recipe, corpus, True)
    report["heldout_overlap"] = _training_overlap(corpus, tok)
    print(f"13-gram overlap of the retention report's held-out sources with the training text: "
          f"{report['heldout_overlap']}", flush=True)
    (out / "prepare.json").write_text(json.dumps(report, indent=1))
    return 0


def _training_overlap(corpus, tokenizer) -> dict[str, float]:
    """Word 13-gram overlap of each held-out source of the retention report with this corpus's training text (the
    teacher's samples could repeat what it memorised): a held-out source must stay near 0."""
    from hybridize.eval.heldout import HELDOUT_SOURCES, ngram_overlap, read_documents

    texts = [tokenizer.decode(t.ids[a:b]) for t in corpus.train for a, b in zip(t.offsets[:-1], t.offsets[1:])]
    return {s: round(ngram_overlap(texts, read_documents(s)), 5) for s in HELDOUT_SOURCES}


class StageEndHeldout:
    """`train(on_step=...)`: after the last step of each stage, the student's perplexity on the retention report's
    held-out sources (its 4 windows of 512 and of 2K tokens each), and with `probes` its answers to the report's 100
    factual probes (correct, and how many repeat the prompt) and pass-key exact match at 1K and 4K with the needle
    outside a 256-token window (depths 0.1 and 0.5, 2 trials: 4 probes a length), so that one run shows what each stage
    does out of domain, to the facts and to retrieval (the window run of the thirteenth session lost both, and only the
    end was measured). Every model is measured in the run's precision (bf16 autocast inside the trainer: Accelerate
    wraps the student's forward in it), so these are close to, not the same as, the report's fp32 numbers. `measure()`
    also serves the teacher and the untrained conversion."""

    WINDOWS = (512, 2048)

    def __init__(self, student, tokenizer, last_steps: dict[str, int], bf16: bool, probes: bool = False,
                 passkey_lengths: tuple[int, ...] = (1024, 4096)):
        self.student, self.tokenizer, self.last_steps, self.bf16 = student, tokenizer, last_steps, bf16
        self.probes, self.passkey_lengths = probes, passkey_lengths
        self.results: dict[str, dict] = {}
        self.seconds = 0.0  # time spent measuring inside training, not training

    @torch.no_grad()
    def measure(self, model) -> dict[str, dict[str, float]]:
        from hybridize.eval.heldout import HELDOUT_SOURCES
        from hybridize.eval.perplexity import perplexity

        modes = {m: m.training for m in model.modules()}
        model.eval()
        device = next(model.parameters()).device
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = {src: {str(w): round(perplexity(model, self.tokenizer, src, w, max_windows=4).perplexity, 3)
                             for w in self.WINDOWS} for src in HELDOUT_SOURCES}
                if self.probes:
                    out.update(self._behaviour(model))
                return out
        finally:
            for m, training in modes.items():
                m.train(training)

    def _behaviour(self, model) -> dict:
        from hybridize.eval.probes import PROBES
        from hybridize.eval.retention import probe_completions, score_probes
        from hybridize.eval.retrieval import run_retrieval

        scored = score_probes(probe_completions(model, self.tokenizer, [p[1] for p in PROBES]), PROBES)
        keys = run_retrieval(model, self.tokenizer, "passkey", self.passkey_lengths, (0.1, 0.5), trials=2)
        # the likelihood choice beside greedy exact match: a trained hybrid can rank the key first at every length
        # while greedy decoding misses a digit (2026-12-03: choice 1.00 at 1K-16K, exact 0.17-0.67)
        return {"probes_correct": scored["correct"], "probes_echoed": scored["echoed"],
                "passkey_exact": {str(n): row for n, row in zip(self.passkey_lengths, keys.grid)},
                "passkey_choice": {str(n): row for n, row in zip(self.passkey_lengths, keys.choice_grid)},
                # greedy misses that never began the key (its leading space token lost to another word)
                "passkey_first_token_misses": dict(zip(map(str, self.passkey_lengths), keys.first_token_misses))}

    def __call__(self, global_step: int, record: dict) -> None:
        if record["step"] != self.last_steps.get(record["stage"]):
            return
        t = time.perf_counter()
        self.results[record["stage"]] = self.measure(self.student)
        self.seconds += time.perf_counter() - t
        print(f"held-out perplexity after {record['stage']}: {self.results[record['stage']]}", flush=True)


def set_stage_steps(recipe, text: str) -> None:
    """--steps "567,382,217": each stage's step count in place of its token budget; 0 leaves a stage out, so that one
    run can stop after distillation and others start from its export (model.converted) with the long stage alone."""
    try:
        steps = [int(x) for x in text.split(",")]
    except ValueError:
        steps = []
    if len(steps) != len(recipe.stages) or min(steps) < 0 or max(steps) < 1:
        raise SystemExit(f"--steps gives {text!r} for {len(recipe.stages)} stages: one count each (0 leaves a stage "
                         f"out), at least one positive")
    for st, n in zip(recipe.stages, steps):
        st.steps, st.tokens = n, None
    recipe.stages = [st for st in recipe.stages if st.steps]


def cmd_quality(args) -> int:
    """Train the recipe for --train-seconds and export it; then (unless --no-retention) the retention report of the
    source, the trained hybrid loaded from its exported folder as a user loads it, and the conversion before training
    (--save-untrained), side by side."""
    from hybridize.export import save_hybrid
    from hybridize.train.models import load_models
    from hybridize.train.trainer import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = _bench_recipe(args, f"output.dir={args.run_dir}")
    if args.steps:  # the same step counts for runs that share a GPU (timing one beside the others misleads)
        set_stage_steps(recipe, args.steps)
    t0 = time.perf_counter()
    student, teacher, tok, desc = load_models(recipe, need_teacher=True)
    if args.save_untrained:
        save_hybrid(student, args.save_untrained, tok, force=True)
    dev = args.device
    teacher = teacher.to(dev)
    if not args.steps:
        split = [float(x) for x in args.split.split(",")]
        if len(split) != len(recipe.stages):
            raise SystemExit(f"--split gives {len(split)} shares for {len(recipe.stages)} stages")
        factors = tuple(int(x) for x in args.micro_factors.split(","))
        for st, n in zip(recipe.stages, calibrate(recipe, student, teacher, args.train_seconds, split, dev, factors)):
            st.steps, st.tokens = n, None
    heldout = StageEndHeldout(student, tok, {st.name: st.steps for st in recipe.stages}, recipe.precision == "bf16",
                              probes=args.stage_probes,
                              passkey_lengths=tuple(int(n) for n in args.stage_passkey_lengths.split(",")))
    # the teacher's and the starting model's numbers: a run that continues another's export (model.converted) has
    # both in that run's quality.json already (--no-start-measures saves about 40 s on an H200)
    student = student.to(dev)
    heldout.results = ({"teacher": heldout.measure(teacher), "converted": heldout.measure(student)}
                       if args.start_measures else {})
    t_train = time.perf_counter()
    result = train(recipe, models=(student, teacher, tok, desc), on_step=heldout)
    train_s = time.perf_counter() - t_train - heldout.seconds
    del student, teacher
    history = result.history
    per_stage = {}
    for st in recipe.stages:
        rows = [h for h in history if h["stage"] == st.name]
        per_stage[st.name] = {"steps": len(rows), "tokens": len(rows) * st.global_batch_tokens, "seq_len": st.seq_len,
                              "tokens_per_s_median": float(np.median([h["tokens_per_s"] for h in rows[1:]] or [0])),
                              "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}
    report = {"device": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu",
              "source": without_machine_paths(desc), "model_dir": without_machine_paths(str(result.model_dir)),
              "train_seconds": train_s, "tokens": result.tokens,
              "tokens_per_s": result.tokens / train_s, "stages": per_stage, "limit_seconds": args.limit_seconds,
              "within_limit": train_s <= args.limit_seconds,
              "heldout_perplexity_by_stage": heldout.results, "heldout_seconds": heldout.seconds,
              "overrides": [without_machine_paths(x) for x in args.set]}
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    print(f"trained {result.tokens:,} tokens in {train_s:.0f} s ({report['tokens_per_s']:,.0f} tokens/s); "
          f"stages {per_stage}", flush=True)
    if not report["within_limit"]:
        print(f"NOT A VALID BENCHMARK RUN: training took {train_s:.0f} s, over the {args.limit_seconds:.0f} s limit")
    if not args.no_retention:
        torch.cuda.empty_cache() if dev.startswith("cuda") else None
        models = {"source": recipe.teacher.source or recipe.model.source, "trained": str(result.model_dir)}
        if args.save_untrained:
            models["converted"] = args.save_untrained
        _retention(models, "source", out / "retention", dev, quick=args.quick_retention)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _retention(specs: dict[str, str], reference: str, out: Path, device: str, quick: bool = False,
               trials: int = 3, reuse_reference: str | None = None) -> dict:
    """The retention report of models given as {name: "default" | .gguf | folder}. Hybrid folders load the way a user
    loads them (AutoModelForCausalLM with trust_remote_code: the folder's own modeling files); they are this
    benchmark's own exports. `reuse_reference`: an earlier retention.json whose measurements of the reference are
    taken, not measured again (it is still loaded, for agreement)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridize.arch import register_auto_classes
    from hybridize.eval.loading import LoadedModel, load_model
    from hybridize.export import is_hybrid_folder
    from hybridize.eval.retention import (RetentionSettings, reference_measurements, retention_report,
                                          write_retention_report)

    register_auto_classes()  # else the tokenizer load of a folder with auto_map waits 15 s on a trust prompt
    try:
        measured = reference_measurements(reuse_reference, reference) if reuse_reference else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights for every model; matrix products in tf32
    models = {}
    for name, spec in specs.items():
        if is_hybrid_folder(spec):
            model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=True, dtype=torch.float32)
            models[name] = LoadedModel(name, model.to(device).eval(), AutoTokenizer.from_pretrained(spec), "hybrid")
        else:
            models[name] = load_model(spec, dtype="float32", device=device)
            models[name].name = name
    settings = RetentionSettings.quick() if quick else RetentionSettings(trials=trials)
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "retention.partial.json"  # what a run cut short still leaves
    results = retention_report(models, settings, reference=reference,
                               log=lambda line: print(f"[{time.perf_counter() - t:.0f} s] {line}", flush=True),
                               on_model=lambda r: partial.write_text(json.dumps(r, indent=1, default=str)),
                               measured=measured)
    results["bench_seconds"] = time.perf_counter() - t
    write_retention_report(results, out)
    partial.unlink(missing_ok=True)
    print((out / "retention.md").read_text())
    print(f"retention report: {len(models)} models in {results['bench_seconds']:.0f} s -> {out}", flush=True)
    return results


def cmd_retention(args) -> int:
    specs = dict(x.split("=", 1) for x in args.model)
    _retention(specs, args.reference, Path(args.out), args.device, quick=args.quick, trials=args.trials,
               reuse_reference=args.reuse_reference)
    return 0


def cmd_merge(args) -> int:
    """One retention report from several (e.g. the source measured once, each trained hybrid in its own run)."""
    from hybridize.eval.report import write_retention_report
    from hybridize.eval.retention import merge_reports

    merged = merge_reports([json.loads(Path(p).read_text()) for p in args.reports], args.reference)
    write_retention_report(merged, Path(args.out))
    print((Path(args.out) / "retention.md").read_text())
    return 0


def cmd_smoke(args) -> int:
    """The training loop end to end on the device with a tiny model (bf16 autocast, packed batches, both stages)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_train_support as S

    from hybridize.train.recipe import recipe_from_dict
    from hybridize.train.trainer import train

    root = Path(args.work)
    docs = root / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(Path(args.texts).glob("*.txt"))[:6]):
        text = f.read_text(encoding="latin-1")
        (docs / f"doc{i}.txt").write_text(text[len(text) // 3 : len(text) // 3 + 4000])
    src = S.make_tiny_source(root / "src", docs)
    recipe = S.tiny_recipe(src, docs, root / "out", root / "cache", precision=args.precision)
    t = time.perf_counter()
    result = train(recipe_from_dict(recipe))
    print(f"smoke: {len(result.history)} steps in {time.perf_counter() - t:.1f} s, losses "
          f"{[round(h['loss'], 4) for h in result.history]}, exported {result.model_dir}")
    if torch.cuda.is_available():
        packed_check()
    return 0


def packed_check() -> None:
    """SmolLM2-shaped random hybrid on the GPU (the kernels' path): packed documents vs each document alone."""
    from transformers import LlamaForCausalLM

    from hybridize.convert.build import build_hybrid
    from hybridize.select.placement import layer_types_from, uniform_layers
    from hybridize.train.data import make_batch
    from hybridize.train.losses import IGNORE, cross_entropy_sum

    torch.manual_seed(0)
    dense = LlamaForCausalLM(smollm2_config())
    hybrid = build_hybrid(dense, layer_types_from(30, uniform_layers(30, 8))).cuda().float()
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, 49152, 2048).astype(np.int32), np.array([0, 700, 1500])),
            (rng.integers(0, 49152, 2048).astype(np.int32), np.array([0, 1030]))]
    batch = make_batch(seqs, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = hybrid(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                     use_cache=False)
        packed, n = cross_entropy_sum(out.logits, batch["targets"])
        sep, m = 0.0, 0
        for tokens, starts in seqs:
            b = list(starts) + [len(tokens)]
            for a, e in zip(b[:-1], b[1:]):
                ids = torch.from_numpy(tokens[a:e].astype(np.int64))[None].cuda()
                o = hybrid(input_ids=ids, use_cache=False)
                tg = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE, device="cuda")], 1)
                s_, c_ = cross_entropy_sum(o.logits, tg)
                sep, m = sep + float(s_), m + int(c_)
    print(f"packed check (cuda, bf16 autocast): packed {float(packed) / int(n):.5f} vs separate {sep / m:.5f} "
          f"({int(n)} vs {m} tokens)", flush=True)


def cmd_compare(args) -> int:
    """Loss curves of runs of the same recipe, step by step, against the first (e.g. 1 GPU seed 0 vs FSDP on 2 GPUs,
    with a second seed and a rerun of the first beside them as the yardstick of run-to-run noise)."""
    names = [Path(f).stem for f in args.runs]
    runs = [[json.loads(x) for x in Path(f).read_text().splitlines() if x.strip()] for f in args.runs]
    n = min(len(r) for r in runs)
    print("| step | stage | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for i in range(n):
        print(f"| {runs[0][i]['global_step']} | {runs[0][i]['stage']} | "
              + " | ".join(f"{r[i]['loss']:.4f}" for r in runs) + " |")
    print(f"\nmean |loss - {names[0]}| per stage over the common steps (and the same after a 5-step moving average):")
    for st in dict.fromkeys(x["stage"] for x in runs[0][:n]):
        idx = [i for i in range(n) if runs[0][i]["stage"] == st]
        a = np.array([runs[0][i]["loss"] for i in idx])
        cells = []
        for name, r in zip(names[1:], runs[1:]):
            b = np.array([r[i]["loss"] for i in idx])
            d = np.abs(b - a)
            k = np.ones(5) / 5
            ds = np.abs(np.convolve(b, k, "valid") - np.convolve(a, k, "valid")) if len(a) >= 5 else d
            cells.append(f"{name}: {d.mean():.4f} ({ds.mean():.4f})")
        print(f"stage {st} ({len(idx)} steps, median loss {np.median(a):.3f}): " + "; ".join(cells))
    for name, r in zip(names, runs):
        print(f"held-out {name}: {[round(x['heldout_loss'], 4) for x in r if 'heldout_loss' in x]}")
    return 0


def _recipe_parser(sub, name: str, recipe: str, num_sources: int):
    """A subcommand that runs a recipe: --recipe, --source, --texts over its first --num-sources sources, --set, --device
    (what _bench_recipe reads)."""
    p = sub.add_parser(name)
    p.add_argument("--source", default=None, help="the model to convert (default: the recipe's)")
    p.add_argument("--recipe", default=recipe)
    p.add_argument("--texts", default=None, help="folder of the Shakespeare texts (overrides the recipe's paths)")
    p.add_argument("--num-sources", type=int, default=num_sources)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--device", default="cuda")
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--out", default="bench-out")
    t.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    t.add_argument("--tokens-per-step", type=int, default=16384)
    t.add_argument("--steps", type=int, default=6)
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    t.add_argument("--shape", nargs="+", default=["smollm2"], choices=sorted(THROUGHPUT_SHAPES),
                   help="model shapes, in order (llama3-1b: Llama-3.2-1B's)")
    t.add_argument("--loss-chunk", type=int, default=0, help="tokens per loss chunk (0: the whole logits at once)")
    t.add_argument("--document-tokens", type=int, default=0,
                   help="the hybrid reads packed documents of this many tokens, as in training (cu_seqlens; 0: rows)")
    t.add_argument("--cuda-graphs", action="store_true", help="also time each model's forward and backward replayed "
                   "from CUDA graphs, as a stage with cuda_graphs trains (rows, the trainer's loss kernel)")
    t.add_argument("--compile", action="store_true", help="also time each model compiled in place (torch.compile: "
                   "the dense model's whole layers, the hybrid's MLPs and norms)")
    t.add_argument("--profile", action="store_true", help="profile one step of each row (device busy time against "
                   "wall time, kernel launches, the top ops)")
    t.add_argument("--lightning-kv-heads", nargs="+", default=["query"], choices=["query", "source"],
                   help="hybrids to time: K/V expanded per query head (query) and/or the source's K/V heads")
    q = _recipe_parser(sub, "quality", "recipes/retention.yaml", 0)
    q.add_argument("--save-untrained", default=None, help="export the conversion before training to this folder "
                   "(and report it beside the others)")
    q.add_argument("--no-retention", action="store_true", help="train and export only")
    q.add_argument("--stage-probes", action=argparse.BooleanOptionalAction, default=True,
                   help="after each stage also the 100 factual probes and pass-key at 1K / 4K (about 20 s a stage on "
                        "an H200 for SmolLM2; not counted as training)")
    q.add_argument("--stage-passkey-lengths", default="1024,4096",
                   help="the stage-end pass-key's lengths (e.g. 1024,4096,16384,32768 for a long-stage screen)")
    q.add_argument("--start-measures", action=argparse.BooleanOptionalAction, default=True,
                   help="the stage-end measures of the teacher and of the model before training too")
    q.add_argument("--quick-retention", action="store_true", help="tiny retention settings (a smoke test)")
    q.add_argument("--train-seconds", type=float, default=480)
    q.add_argument("--split", default="0.35,0.35,0.3", help="share of the training time per stage (for "
                   "recipes/retention.yaml 0.4,0.4,0.2 measured better than 0.2,0.6,0.2, and 0.35,0.35,0.3 of 840 s "
                   "better than 0.4,0.4,0.2 of 660 s on pass-key: bench/results/retention.md)")
    q.add_argument("--steps", default=None, help="step counts per stage (e.g. 40,100,40) instead of calibrating them "
                   "for --train-seconds: the same counts for runs that share a GPU; 0 leaves a stage out")
    q.add_argument("--limit-seconds", type=float, default=900.0,
                   help="the benchmark's training-time limit (issue 8: 15 minutes); the report says whether the run "
                        "stayed within it (a contended host can make the calibrated plan run long)")
    q.add_argument("--micro-factors", default="1", help="micro-batch multiples to time per stage (e.g. 1,2,4); "
                   "the fastest per token that fits is used")
    q.add_argument("--run-dir", default="/tmp/hybridize-quality-run")
    q.add_argument("--out", default="bench-out")
    rr = sub.add_parser("retention")
    rr.add_argument("--model", action="append", required=True, help="NAME=SPEC (default, a .gguf, a folder); repeat")
    rr.add_argument("--reference", default="source")
    rr.add_argument("--quick", action="store_true")
    rr.add_argument("--reuse-reference", default=None, help="an earlier retention.json (same settings): its "
                    "measurements of the reference are taken, not measured again (e.g. the source's, "
                    "bench/results/retention-2026-12-01); the other models are always measured")
    rr.add_argument("--trials", type=int, default=3, help="retrieval probes per length and depth")
    rr.add_argument("--device", default="cuda")
    rr.add_argument("--out", default="bench-out/retention")
    mg = sub.add_parser("merge", help="one retention report from several retention.json files")
    mg.add_argument("reports", nargs="+", help="retention.json files measured with the same settings")
    mg.add_argument("--reference", default="source")
    mg.add_argument("--out", default="bench-out/retention")
    pp = _recipe_parser(sub, "prepare", "recipes/retention.yaml", 0)
    pp.add_argument("--methods", default="sala", help="placement methods whose layer scores to cache")
    pp.add_argument("--out", default="bench-out")
    pr = _recipe_parser(sub, "profile", "recipes/smollm2-gpu.yaml", 2)
    pr.add_argument("--micro", type=int, default=None, help="micro-batch (default: each stage's)")
    pr.add_argument("--rows", type=int, default=25)
    sm = sub.add_parser("smoke")
    sm.add_argument("--texts", required=True)
    sm.add_argument("--work", default="/tmp/hybridize-smoke")
    sm.add_argument("--precision", default="bf16")
    c = sub.add_parser("compare")
    c.add_argument("runs", nargs="+", help="metrics.jsonl files; the first is the reference")
    args = ap.parse_args()
    return {"throughput": cmd_throughput, "quality": cmd_quality, "prepare": cmd_prepare, "retention": cmd_retention,
            "merge": cmd_merge, "profile": cmd_profile, "smoke": cmd_smoke, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
