#!/usr/bin/env bash
# Run by tools/retention_device.sh start (in the background): prepare once, then every variant at the same time
# (SEQUENTIAL=1: one after another). REPORT=0: no retention reports, only each run's quality.json (held-out
# perplexity, probes and pass-key after every stage): screens whose stage-end numbers decide, at ~190 s less a run.
# NO_REPORT="name ...": variants whose report is skipped (a base run that later variants continue from: its
# stage-end numbers are the screens' starting point).
# Long-stage screens from one distilled model, one machine: VARIANTS="base:--set model.lightning_window=256
# --steps 567,382,0;a:--set model.converted=/tmp/ret_base/model --steps 0,0,217 ...;b:..." NO_REPORT=base
# SEQUENTIAL=1 (each run's export is /tmp/ret_NAME/model; `--steps` 0 leaves a stage out).
# $1 VARIANTS ("name:overrides;..."), $2 training seconds per variant, $3 output folder.
set -uo pipefail
VARIANTS=$1; SECS=$2; OUT_DIR=$3
RECIPE=${RECIPE:-recipes/retention.yaml}
CACHE=$OUT_DIR/../cache
t=$(date +%s)
COMMON=${COMMON:-}  # overrides for prepare and every variant (e.g. --set data.sources[0].num_samples=4096)
# METHODS: the placements whose layer scores prepare caches (the variants' model.select reads them from the cache;
# bench/cache's tarball holds sala's, block_influence's and both window searches' for the default model: with RoPE
# and, what the recipe reads with HyPE on, without it; a window search with other options runs once, ~290 s on an H200)
python3 bench/train_quality.py prepare --recipe $RECIPE --set data.cache_dir=$CACHE $COMMON --methods ${METHODS:-window,sala,block_influence} \
  --out $OUT_DIR/prepare > $OUT_DIR/prepare.log 2>&1 || { echo "prepare failed"; tail -30 $OUT_DIR/prepare.log; touch $OUT_DIR/ALL_DONE; exit 1; }
echo "prepare: $(( $(date +%s) - t )) s"; tail -5 $OUT_DIR/prepare.log
# VARIANTS="" prepares only: the corpus and scores come back through `wait` for a later session's cache
[ -z "$VARIANTS" ] && { touch $OUT_DIR/ALL_DONE; exit 0; }
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
IFS=';' read -ra VS <<< "$VARIANTS"
# several runs sharing the GPU: smaller micro-batches (same global batches, so the same optimisation) fit in memory
# together (2026-12-01: five at once ran at 13.5-13.9K tokens/s each, bench/results/retention.md)
# Each run times its steps for SECS while the others start up, so their step counts differ (2026-12-01: 81 vs 37-39
# long-stage steps; runs overran 600 s by 60-85%): give several runs the same STEPS="align,distil,long" instead.
# SEQUENTIAL=1: one run after another, each alone on the GPU and all CPUs (at fixed STEPS, shorter ones: screens),
# each report beside the next run's training
[ ${#VS[@]} -gt 1 ] && [ "${SEQUENTIAL:-0}" != 1 ] && SHARED=${SHARED:-"--set stages[0].micro_batch_size=16 --set stages[1].micro_batch_size=4 --set stages[2].micro_batch_size=1"}
SHARED=${SHARED:-}
# Reports: the source is not measured again (its H200 measurements of 2026-12-01 are in bench/results; it took 459 s
# beside the training runs); each model is measured in its own process beside it (agreement needs both in memory).
SOURCE_JSON=${SOURCE_JSON:-bench/results/retention-2026-12-01/retention.json}
# TRIALS (default 3, as the stored source's): 9 probes per retrieval task and length against the source's 9 (2 trials
# gave 6: one probe moved a cell by 0.17; retrieval took 193 s with 2 on an H200, twenty-first session)
report() {  # $1 name, $2 model spec
  [[ " ${NO_REPORT:-} " == *" $1 "* ]] && return
  python3 bench/train_quality.py retention --model source=default --model $1=$2 --reuse-reference $SOURCE_JSON \
    --trials ${TRIALS:-3} --out $OUT_DIR/retention_$1 > $OUT_DIR/retention_$1.log 2>&1
  echo "report $1: rc=$?, $(( $(date +%s) - t )) s"
  # where a greedy pass-key answer is lost, token by token (the report counts first-token misses; this shows the
  # margin by which the key's first token loses; nine forward passes, not yet timed)
  python3 bench/passkey_tokens.py $2 --lengths ${PK_LENGTHS:-1024,4096,16384} --depths 0.1,0.5,0.9 \
    --out $OUT_DIR/retention_$1/passkey_tokens.json > $OUT_DIR/passkey_tokens_$1.log 2>&1
  echo "passkey tokens $1: rc=$?"
}
# SPLIT: the stages' shares of SECS (unset: bench/train_quality.py's default, recipes/retention.yaml's split)
train() {  # $1 "name:overrides", $2 first CPU, $3 CPUs, $4 1 for the first run (it also saves the conversion)
  local name=${1%%:*} extra=${1#*:} cpu=$2 per=$3
  mkdir -p $OUT_DIR/$name
  echo "$name: CPUs $cpu-$((cpu + per - 1)), overrides: $extra"
  PIN=$(command -v taskset >/dev/null && echo "taskset -c $cpu-$((cpu + per - 1))")
  OMP_NUM_THREADS=$(( per > 1 ? per / 2 : 1 )) $PIN \
    python3 bench/train_quality.py quality --recipe $RECIPE --set data.cache_dir=$CACHE $COMMON \
    --set output.checkpoint_every=100000 --set 'logging.trackers=[]' --run-dir /tmp/ret_$name $SHARED \
    --train-seconds $SECS ${SPLIT:+--split $SPLIT} --no-retention ${STEPS:+--steps $STEPS} \
    $([ $4 = 1 ] && echo --save-untrained $OUT_DIR/converted_model) $extra \
    --out $OUT_DIR/$name > $OUT_DIR/$name/quality.log 2>&1
  touch $OUT_DIR/$name/done
}
if [ "${SEQUENTIAL:-0}" = 1 ]; then
  i=0
  for v in "${VS[@]}"; do
    name=${v%%:*}
    train "$v" 0 $(nproc) $([ $i = 0 ] && echo 1 || echo 0)
    i=$((i + 1))
    echo "$name trained: $(( $(date +%s) - t )) s"
    [ "${REPORT:-1}" = 1 ] && [ -d /tmp/ret_$name/model ] && report $name /tmp/ret_$name/model &
  done
  echo "all variants trained: $(( $(date +%s) - t )) s"
else
  PER=$(( $(nproc) / ${#VS[@]} )); i=0
  for v in "${VS[@]}"; do
    train "$v" $((i * PER)) $PER $([ $i = 0 ] && echo 1 || echo 0) &
    i=$((i + 1))
  done
  # All reports once every run has finished: beside them a report slowed the runs that were timing their steps
  # (2026-12-01).
  while [ $(ls -d $OUT_DIR/*/done 2>/dev/null | wc -l) -lt ${#VS[@]} ]; do sleep 5; done
  echo "all variants trained: $(( $(date +%s) - t )) s"
  for v in "${VS[@]}"; do
    name=${v%%:*}; [ "${REPORT:-1}" = 1 ] && [ -d /tmp/ret_$name/model ] && report $name /tmp/ret_$name/model &
  done
fi
# One trial per length is enough for the conversion's report (its retrieval was 0 everywhere); TRIALS_CONVERTED=0
# skips it (measured twice: 102x and 120x the source's perplexity, no retrieval, at most 1 probe; retention.md).
[ -d $OUT_DIR/converted_model ] && [ "${TRIALS_CONVERTED:-1}" != 0 ] && \
  TRIALS=${TRIALS_CONVERTED:-1} report converted $OUT_DIR/converted_model &
wait
if [ "${REPORT:-1}" = 1 ]; then
  python3 bench/train_quality.py merge $OUT_DIR/retention_*/retention.json --out $OUT_DIR/retention > $OUT_DIR/merge.log 2>&1
  for f in $OUT_DIR/retention_*.log; do echo "=== $f"; grep -E "^\[|retention report" $f | tail -3; done
  head -25 $OUT_DIR/retention/retention.md
fi
touch $OUT_DIR/ALL_DONE
