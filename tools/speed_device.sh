#!/usr/bin/env bash
# Issue 18's speed numbers in one call on a lent one-H200 machine (this workplace's `device` tool), each number beside
# its peer from the same run. One `run` call, from the repository root:
#   run  command: bash tools/speed_device.sh      carry: [".dev_speed"]      (timeout_s 600; kind nvidia-h200)
# .dev_speed/ holds the fla 0.6.0 wheels (flash_linear_attention, fla_core; the image has einops, torch, triton and
# transformers). Make it HERE, not on the device:  bash tools/speed_device.sh pieces
# (it is ignored through .git/info/exclude).
#
# Parts, in order of importance, each under `timeout` with its own seconds (env; defaults 380 + 55 + 55 s, and about
# 10 s of installing and summing up: at most ~500 s, inside the tool's 600 s; ~450 s expected):
#   model  SECS_MODEL=380  bench/bench_model.py, Llama-3-8B shape and its 1:3 hybrid: time to first token at 128K and
#                          256K, hybrid vs one-pass dense SDPA; the hybrid at 1M and 2M (prefill, decode at batch 1,
#                          peak memory; the dense model's status there); the longest context whose cache fits, both
#                          models (allocation probe on the bare weights); decode at 128K: the hybrid at HYB_BATCHES,
#                          the dense model at DENSE_BATCHES (each list ends at its first out-of-memory batch, so the
#                          last that ran is the largest that fits). The dense model decodes from its one-pass-prefilled
#                          cache (the same DynamicCache tensors a chunked prefill leaves; this saves a second 8B build
#                          and a 128K prefill); DENSE_MODES=chunked,one-pass adds the chunked-prefill dense model at
#                          128K and decodes from that cache as well. bench_model's --budget is SECS_MODEL - 15: a
#                          length whose predicted time passes its model's cap is recorded as skipped, not cut off.
#   train  SECS_TRAIN=55   bench/train_quality.py throughput (TRAIN_SHAPES picks shapes): hybrid vs dense tokens/s (fwd + bwd + AdamW, bf16
#                          autocast, loss in 8K-token chunks) at 2K, 8K and 32K, SmolLM2-135M and Llama-3.2-1B shapes.
#   kernel SECS_KERNEL=55  bench/bench_lightning.py: our Lightning kernels vs fla 0.6.0: forward at 64K vs the memory
#                          floor, fwd+bwd at 16K and 64K, decode at batch 8 as a CUDA graph.
# tools/device_precompile.py compiles the train and kernel parts' Triton kernels (fla's autotuning configurations too,
# untimed; fla's first call otherwise spends ~2 minutes compiling) into Triton's disk cache in the background while the
# hybrid prefills 1M and 2M tokens; the kernel part waits for it.
# PARTS="model train kernel" picks parts. Results in $OUT (at most 8 files come back): prefill_results.jsonl,
# prefill_info.json, prefill_fit.json, throughput.json, lightning.json, summary.md (one line per number: value, peer,
# ratio, issue 18's target) and logs.tar.gz (every log and bench_model's full report). The summary is printed last;
# here, `python3 tools/speed_summary.py DIR` prints it again from those files.
set -uo pipefail
if [ "${1:-}" = pieces ]; then  # HERE: the wheels the device lacks
  grep -qx "/.dev_speed/" .git/info/exclude 2>/dev/null || echo "/.dev_speed/" >> .git/info/exclude
  rm -rf .dev_speed && mkdir -p .dev_speed
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .dev_speed flash-linear-attention==0.6.0 fla-core==0.6.0 || exit 1
  du -sh .dev_speed && ls .dev_speed
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev_speed/*.whl && export PYTHONPATH=/tmp/site:$PWD \
  || { echo "fla wheels not installed: the kernel part times ours alone"; export PYTHONPATH=$PWD; }
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/speed_out}
W=/tmp/speed
rm -rf $W && mkdir -p $OUT $W/prefill
SECS_MODEL=${SECS_MODEL:-380} SECS_TRAIN=${SECS_TRAIN:-55} SECS_KERNEL=${SECS_KERNEL:-55}
PARTS=" ${PARTS:-model train kernel} "
LENGTHS=${LENGTHS:-128K,256K,1M,2M}             # every model; the one-pass dense model records 1M and 2M as OOM
HYB_BATCHES=${HYB_BATCHES:-8,16,24,26,28,30,32,40,48,64}  # decode at 128K (4 GiB of K/V per sequence)
DENSE_BATCHES=${DENSE_BATCHES:-1,5,6,7,8}        # decode at 128K (16 GiB of K/V per sequence)
DENSE_MODES=${DENSE_MODES:-one-pass}
TRAIN_TOKENS=${TRAIN_TOKENS:-16384}              # tokens per training step (one sequence at least)
T_START=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import importlib.metadata as m, torch, triton, transformers; print('torch', torch.__version__, 'triton',
  triton.__version__, 'transformers', transformers.__version__, 'fla-core', m.version('fla-core'))" 2>&1 | tail -1
quiet() { grep -v -i -E "warn|it/s\]|s/it\]" ; }  # keep the console short; the logs hold everything

# compile the later parts' kernels: in the background once the hybrid has passed 256K (while it prefills 1M and 2M),
# or first, in the foreground, when the model part is not run
PRE_PARTS=$([[ $PARTS == *" train "* ]] && echo -n "train "; [[ $PARTS == *" kernel "* ]] && echo -n lightning)
precompile() {
  echo "[$((SECONDS - T_START)) s] precompile starts ($PRE_PARTS)" >> $W/precompile.log
  timeout -k 5 ${SECS_PRECOMPILE:-240} python3 tools/device_precompile.py --parts $PRE_PARTS \
    --tokens-per-step $TRAIN_TOKENS >> $W/precompile.log 2>&1
  echo "[$((SECONDS - T_START)) s] precompile ends (exit $?)" >> $W/precompile.log
}
PRE=
if [ -n "$PRE_PARTS" ] && [[ $PARTS == *" model "* ]]; then
  ( for _ in $(seq 1 $((SECS_MODEL + 10))); do
      grep -q -E '"model": "hybrid[^"]*", "length": 262144' $W/prefill/results.jsonl 2>/dev/null && break
      [ -f $W/model.done ] && break
      sleep 1
    done
    precompile ) &
  PRE=$!
elif [ -n "$PRE_PARTS" ]; then
  precompile; cat $W/precompile.log
fi

if [[ $PARTS == *" model "* ]]; then
  echo "=== [$((SECONDS - T_START)) s] model: prefill, 2M, decode at 128K (timeout $SECS_MODEL s)"
  CHUNKED=()
  [[ $DENSE_MODES == *chunked* ]] && CHUNKED=(--lengths-of chunked=128K --decode-at "chunked:128K=$DENSE_BATCHES")
  timeout -k 10 $SECS_MODEL python3 bench/bench_model.py --out $W/prefill --budget $((SECS_MODEL - 15)) \
    --dense-share ${DENSE_SHARE:-0.27} --dense-modes $DENSE_MODES --variants block --lengths $LENGTHS \
    --decode-batches 1 --decode-steps 10 --decode-at "hybrid:128K=$HYB_BATCHES" \
    --decode-at "one-pass:128K=$DENSE_BATCHES" "${CHUNKED[@]}" --dense-warmup 32K --dense-decode-warmup 2 \
    --fit-search > $W/prefill.log 2>&1
  echo "bench_model.py exit $?"
  grep -E "built in|longest context|warm-up at|\) [0-9.]+[KM]?: |^\| " $W/prefill.log | quiet | tail -40
  for f in results.jsonl info.json fit.json; do [ -f $W/prefill/$f ] && cp $W/prefill/$f $OUT/prefill_$f; done
fi
touch $W/model.done

if [[ $PARTS == *" train "* ]]; then
  echo "=== [$((SECONDS - T_START)) s] train: throughput (timeout $SECS_TRAIN s)"
  timeout -k 10 $SECS_TRAIN python3 bench/train_quality.py throughput --out $W/train --shape ${TRAIN_SHAPES:-smollm2 llama3-1b} \
    --lengths 2048 8192 32768 --tokens-per-step $TRAIN_TOKENS --steps ${TRAIN_STEPS:-3} \
    --loss-chunk 8192 > $W/train.log 2>&1
  echo "train_quality.py exit $?"
  grep -E "built in|^\{|^\| " $W/train.log | tail -16
  [ -f $W/train/throughput.json ] && cp $W/train/throughput.json $OUT/throughput.json
fi

if [[ $PARTS == *" kernel "* ]]; then
  echo "=== [$((SECONDS - T_START)) s] kernel: Lightning vs fla (timeout $SECS_KERNEL s; waiting for the precompile)"
  [ -n "$PRE" ] && wait $PRE
  cat $W/precompile.log 2>/dev/null
  echo "[$((SECONDS - T_START)) s] bench_lightning starts"
  timeout -k 10 $SECS_KERNEL python3 bench/bench_lightning.py --lengths 16384 65536 --batches 8 --variants default \
    --skip norm_gate bthd --sdpa-max 0 --budget $((SECS_KERNEL - 10)) --json $OUT/lightning.json > $W/lightning.log 2>&1
  echo "bench_lightning.py exit $?"
  grep -E "^check|copy bandwidth|skipped|fla not|^\| " $W/lightning.log | tail -12
fi

echo "=== [$((SECONDS - T_START)) s] summary"
python3 tools/speed_summary.py $OUT --out $OUT/summary.md
tar czf $OUT/logs.tar.gz -C $W --exclude='*.png' . 2>/dev/null
ls -la $OUT
echo "[$((SECONDS - T_START)) s] done"
