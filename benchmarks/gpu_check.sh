#!/usr/bin/env bash
# The GPU checks of issues 10 and 15 in one time-bounded call, for a session that has a GPU
# machine: the GPU tests (the gpu-marked ones, and the speed-path tests that run on CUDA when it
# is present), the benchmark (reference vs ours, torch.compile, a batch sweep, the loaders, a
# colorize size) and a short gpu-demo training run. Each step has its own time limit; a failing
# step does not stop the next.
#
# On the GPU machine, from the project root, after staging the packages it lacks
# (../shared/device/stage-wheels.sh and its header explain how; the command-line layer also needs
# tyro:  EXTRA_WHEELS="tyro docstring-parser typeguard" bash ../shared/device/stage-wheels.sh):
#     bash .devwheels/install.sh && bash benchmarks/gpu_check.sh
# Logs and results go to $OUT (default /tmp/gpu-check); the benchmark's results files are also
# written to benchmarks/results/, to be committed. Device time is short (about 15 minutes a
# session, start-up included), so the whole script is bounded to 6 minutes.
#     bash benchmarks/gpu_check.sh --dry-run     # print the steps without running them
set -u
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline
OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
# Ours at the reference's batch (16) and at 256, one round each (every compiled point compiles
# afresh, ~1 min); the loaders at all cores once; colorize on one 16 MP photo.
BENCH_ARGS=(--compile --repeats 1 --batch-sweep 256 --warmup 20 --steps 40 --seconds 4
            --synthetic 1024 --worker-counts "$(nproc)" --colorize-megapixels 16
            --point-timeout 100 --output benchmarks/results)
TRAIN_ARGS=(--preset gpu-demo train.steps=100 run_dir=/tmp/gpu-demo log.tracker=none)

step() {  # step NAME SECONDS CMD...: run, keep the log, print one status line
  local name=$1 secs=$2; shift 2
  if [ "$DRY" = 1 ]; then echo "$name (limit ${secs}s): $*"; return 0; fi
  local t0; t0=$(date +%s)
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 ))s   $(tail -n 1 "$OUT/$name.log" | cut -c1-160)"
}

if [ "$DRY" = 0 ]; then
  mkdir -p "$OUT" benchmarks/results
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  # A missing package fails here, in one line, rather than in every step.
  "$PY" -c "import tyro, kornia, webdataset, wandb, torch, nvidia.dali as d; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'dali', d.__version__)" 2>&1 | tail -n 1 | tee -a "$OUT/gpu.txt"
fi
step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_training_gpu.py tests/test_data_gpu.py
step bench 190 "$PY" -m pix2pix_dist.bench "${BENCH_ARGS[@]}"
step sample-shards 20 "$PY" -m pix2pix_dist.shards --source sample --output shards/sample
step demo 30 "$PY" train.py "${TRAIN_ARGS[@]}"
if [ "$DRY" = 0 ]; then
  # Few files come back from the machine: the logs, the newest results pair, the demo's output.
  cp "$(ls -t benchmarks/results/*.json | head -n 1)" "$(ls -t benchmarks/results/*.md | head -n 1)" \
     "$OUT/" 2>/dev/null
  cp /tmp/gpu-demo/samples/latest.png /tmp/gpu-demo/stats.jsonl "$OUT/" 2>/dev/null
  ls -l "$OUT"
fi
