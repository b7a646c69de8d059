#!/usr/bin/env bash
# Device runs behind the numbers of bench/results/training.md (one `run` call each):
#   bash tools/train_device.sh stash-a      carry: .trainwhl .train_gpu_a   (keeps part a, texts, cache in /root/tq)
#   bash tools/train_device.sh quality-bg   carry: .trainwhl .train_gpu_b   (GGUF part b; starts the quality run and
#                                           (it must have the host to itself: the launch-bound SmolLM2 training ran at
#                                           half speed beside three other trainings, which broke its calibration, and
#                                           21% slower beside GPU benchmarks on the other GPU, past 15 minutes)
#                                           the throughput benchmark in the background: a 15-minute run outlasts one
#                                           10-minute call)
#   bash tools/train_device.sh quality-grid carry as quality-bg; VARIANTS="a:--set x=1;b:--set y=2": one run per GPU,
#                                           at the same time, each on its own CPU cores (SECS, SRC, WAIT as above)
#   bash tools/train_device.sh wait         (no carry; waits up to WAIT seconds for the background runs, prints them)
#   (EXTRA="--set model.hype=false" adds recipe overrides; SKIP_TPUT=1 skips the throughput part)
#   bash tools/train_device.sh fsdp         carry: .trainwhl .train_gpu_x2 [.snap]  (3-bit SmolLM2, texts, token cache);
#                                           2 GPUs; S1/S2 steps, PREC bf16|fp32, SRC as for quality-bg
#                                           (or fsdp-seeds on SEED_GPU while GPU 0 trains, then fsdp-pair;
#                                           deepspeed-pair: the same recipe under recipes/accelerate/deepspeed.yaml on
#                                           2 GPUs beside the seed runs, carry .dswhl too; runs of an earlier session
#                                           in .train_gpu_x2/prev/prev_*.jsonl join its comparison)
#   bash tools/train_device.sh profile      carry: .trainwhl .train_gpu_x2  (where a micro-batch of each stage spends
#                                           its time: teacher, student, loss; torch.profiler table; EXTRA: more args)
# The 98 MB GGUF exceeds one call's 64 MiB transfer, hence the split and the 3-bit copy (tools/smollm2_3bit.py pack).
set -uo pipefail
MODE=$1
[ "$MODE" = wait ] || pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1
[ "$MODE" = wait ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .trainwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case $MODE in
stash-a)
  mkdir -p /root/tq && cp -r .train_gpu_a/. /root/tq/ && ls /root/tq
  ;;
quality-bg|quality-grid)
  # quality-bg: one run (EXTRA: overrides) on ${CUDA_VISIBLE_DEVICES:-0}. quality-grid: one run per entry of
  # VARIANTS="name:overrides;name:overrides;..." at the same time, entry i on GPU i and on its own slice of the host's
  # CPU cores (taskset), each with its own copy of the token cache; each must still fit --limit-seconds on its own.
  cat /root/tq/smollm2.part_a .train_gpu_b/smollm2.part_b > /root/tq/smollm2.gguf || exit 3
  md5sum /root/tq/smollm2.gguf
  # SRC: a clean export of a commit (e.g. `git archive HEAD | tar -x -C .snap`, carried) instead of the working tree
  rm -rf /root/repo && cp -r ${SRC:-.} /root/repo && rm -rf /root/qout && mkdir -p /root/qout
  [ $MODE = quality-bg ] && VARIANTS="main:${EXTRA:-}"
  IFS=';' read -ra VS <<< "$VARIANTS"
  PER=$(( $(nproc) / ${#VS[@]} )); i=0
  for v in "${VS[@]}"; do
    name=${v%%:*}; extra=${v#*:}
    gpu=$([ $MODE = quality-bg ] && echo ${CUDA_VISIBLE_DEVICES:-0} || echo $i)
    tput=$([ $MODE = quality-bg ] && [ -z "${SKIP_TPUT:-}" ] && echo 1 || echo "")
    mkdir -p /root/qout/$name && rm -rf /root/tq/cache_$name && cp -r /root/tq/cache /root/tq/cache_$name
    echo "$name: GPU $gpu, CPUs $((i * PER))-$((i * PER + PER - 1)), overrides: $extra"
    # setsid: the run goes on after this call returns (the machine stays held while `wait` calls follow)
    setsid nohup bash -c "cd /root/repo && export PYTHONPATH=/tmp/site:/root/repo PYTHONUNBUFFERED=1 \
      CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=$(( PER > 1 ? PER / 2 : 1 )) && \
      taskset -c $((i * PER))-$((i * PER + PER - 1)) python3 bench/train_quality.py quality \
        --source /root/tq/smollm2.gguf --texts /root/tq/texts --run-dir /tmp/hq_$name \
        --set data.cache_dir=/root/tq/cache_$name --set output.checkpoint_every=100000 --set 'logging.trackers=[]' \
        --train-seconds ${SECS:-780} $extra --out /root/qout/$name > /root/qout/$name/quality.log 2>&1; \
      [ -z \"$tput\" ] || python3 bench/train_quality.py throughput --out /root/qout/$name \
        > /root/qout/$name/throughput.log 2>&1; \
      touch /root/qout/$name/done" > /dev/null 2>&1 < /dev/null &
    i=$((i + 1))
  done
  WAIT=${WAIT:-420}; MODE=wait
  ;&
wait)
  for i in $(seq 1 $(( ${WAIT:-540} / 10 ))); do
    left=0; for d in /root/qout/*/; do [ -f $d/done ] || left=1; done
    [ $left = 0 ] && break; sleep 10
  done
  for d in /root/qout/*/; do
    name=$(basename $d); echo "=== $name"
    grep -v -i -E "warn|it/s\]" $d/quality.log | tail -12; tail -8 $d/throughput.log 2>/dev/null
    grep -h heldout_loss /tmp/hq_$name/metrics.jsonl 2>/dev/null | python3 -c "import sys, json
for l in sys.stdin: r = json.loads(l); print(r['stage'], r['step'], round(r['loss'], 4), round(r['heldout_loss'], 4))"
    mkdir -p $OUT/$name && cp $d/*.json $d/*.jsonl $d/*.log $OUT/$name/ 2>/dev/null
    [ -f $d/done ] && echo "$name DONE" || echo "$name still running"
  done
  ;;
profile)
  D=$PWD/.train_gpu_x2
  [ -d /tmp/smol3 ] || python3 tools/smollm2_3bit.py unpack $D/smollm2-3bit.npz --out /tmp/smol3 2>&1 | tail -1
  python3 bench/train_quality.py profile --source /tmp/smol3 --texts $D/texts --set data.cache_dir=$D/cache \
    ${EXTRA:-} 2>&1 | grep -v -i -E "warn|it/s\]|USDT" | tee $OUT/profile.txt | tail -80
  ;;
fsdp|fsdp-seeds|fsdp-pair|deepspeed-pair)
  # 1 GPU (seed 0) vs FSDP on 2 GPUs (seed 0), same global batch; the yardstick of noise: 1-GPU runs with seeds 1
  # and 2 (other data order) and a rerun of seed 0. `fsdp` does everything (two 1-GPU runs at a time, one per GPU);
  # on a machine whose GPU 0 is busy, `fsdp-seeds` runs three 1-GPU runs (seeds 0, 1, 0 again) at once on SEED_GPU and
  # `fsdp-pair` runs the 2-GPU run and the comparison (FSDP_EXTRA: more overrides, e.g. smaller micro-batches). Runs and metrics are kept in /root/fsdp between calls.
  D=$PWD/.train_gpu_x2
  [ -d /tmp/smol3 ] || python3 tools/smollm2_3bit.py unpack $D/smollm2-3bit.npz --out /tmp/smol3 2>&1 | tail -1
  mkdir -p /root/fsdp && cd ${SRC:-.}
  PREC=${PREC:-bf16}; MP=$([ $PREC = bf16 ] && echo bf16 || echo no)
  SETS="--set model.source=/tmp/smol3 --set data.sources[0].path=$D/texts --set data.sources[1].path=$D/texts
        --set data.cache_dir=$D/cache --set stages[0].tokens=null --set stages[0].steps=${S1:-25}
        --set stages[1].tokens=null --set stages[1].steps=${S2:-25} --set output.checkpoint_every=100000
        --set logging.progress=false --set logging.trackers=[] --set output.export=false --set precision=$PREC
        ${FSDP_EXTRA:-}"
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  one() {  # name gpu seed
    local t=$(date +%s)
    CUDA_VISIBLE_DEVICES=$2 python3 -m hybridize.cli train recipes/smollm2-gpu.yaml $SETS --set seed=$3 \
      --set output.dir=/tmp/$1 > /root/fsdp/$1.log 2>&1
    echo "$1: rc=$? $(( $(date +%s) - t )) s"; cp /tmp/$1/metrics.jsonl /root/fsdp/$1.jsonl
  }
  if [ $MODE = fsdp-seeds ]; then
    G=${SEED_GPU:-1}
    one gpu1_seed0 $G 0 & one gpu1_seed1 $G 1 & one gpu1_seed0_rerun $G 0 & wait
  elif [ $MODE = fsdp ]; then
    one gpu1_seed0 0 0 & one gpu1_seed1 1 1 & wait
    one gpu1_seed0_rerun 0 0 & one gpu1_seed2 1 2 & wait
  fi
  if [ $MODE = deepspeed-pair ]; then  # carry .dswhl too (deepspeed and the packages the image lacks)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $D/../.dswhl/*.whl || exit 1
    # Runs of an earlier call or session kept in $D/prev (prev_*.jsonl) join the comparison; without a 1-GPU seed-0
    # run on this machine, one runs first (the 1-GPU path is deterministic: it must equal prev_gpu1_seed0).
    cp $D/prev/prev_*.jsonl /root/fsdp/ 2>/dev/null
    [ -f /root/fsdp/gpu1_seed0.jsonl ] || one gpu1_seed0 0 0
    t=$(date +%s)
    accelerate launch --config_file recipes/accelerate/deepspeed.yaml --num_processes 2 \
      -m hybridize.cli train recipes/smollm2-gpu.yaml $SETS --set seed=0 --set output.dir=/tmp/ds2_seed0 \
      > /root/fsdp/ds2_seed0.log 2>&1
    echo "ds2_seed0: rc=$? $(( $(date +%s) - t )) s"; grep -v -i warn /root/fsdp/ds2_seed0.log | tail -4
    cp /tmp/ds2_seed0/metrics.jsonl /root/fsdp/ds2_seed0.jsonl
    (cd /root/fsdp && python3 $OLDPWD/bench/train_quality.py compare gpu1_seed0.jsonl ds2_seed0.jsonl \
      $(ls fsdp2_seed0.jsonl gpu1_seed1.jsonl prev_*.jsonl 2>/dev/null) > compare_ds.md; tail -14 compare_ds.md)
  elif [ $MODE != fsdp-seeds ]; then
    t=$(date +%s)
    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 --mixed_precision $MP \
      -m hybridize.cli train recipes/smollm2-gpu.yaml $SETS --set seed=0 --set output.dir=/tmp/fsdp2_seed0 \
      > /root/fsdp/fsdp2_seed0.log 2>&1
    echo "fsdp2_seed0: rc=$? $(( $(date +%s) - t )) s"; grep -v -i warn /root/fsdp/fsdp2_seed0.log | tail -4
    cp /tmp/fsdp2_seed0/metrics.jsonl /root/fsdp/fsdp2_seed0.jsonl
    (cd /root/fsdp && python3 $OLDPWD/bench/train_quality.py compare gpu1_seed0.jsonl fsdp2_seed0.jsonl \
      gpu1_seed0_rerun.jsonl gpu1_seed1.jsonl $(ls gpu1_seed2.jsonl 2>/dev/null) > compare.md; tail -12 compare.md)
  fi
  cp /root/fsdp/* $OUT/ 2>/dev/null; ls /root/fsdp
  ;;
esac
