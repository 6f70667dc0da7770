#!/usr/bin/env bash
# One device call on a lent GPU machine: build with CUDA, the whole test suite, `make bench` for every
# family, and everything under $OUT, within 9 minutes (the device tool allows 10 per command).
#
#   here:    bash tools/fetch_anchor_wheels.sh        # anchors as wheels in .whl/ (git-ignored, ~28 MiB)
#   device:  run(command="bash tools/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# Back under $OUT (at most 8 files come back): summary.txt (each phase's exit code and time), env.txt,
# build.log, test.log, bench.log, results.tar.gz (benchmarks/results/<gpu>/: CSV + PNG per family).
# Each phase has a time limit, so the logs come back even when one hangs. BENCH_ARGS narrows the
# benchmark (e.g. BENCH_ARGS="--op rope --case decode"); with less than 4 minutes left for it, the
# session runs the --quick subset.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kxops-out}
mkdir -p "$OUT"
START=$SECONDS
BUDGET=${GPU_SESSION_SECONDS:-540}

left() { echo $((BUDGET - (SECONDS - START))); }

phase() {  # phase NAME LIMIT_S CMD...: CMD with a time limit, its output in $OUT/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [ "$limit" -lt 20 ]; then
    echo "$name: skipped (no time left)" | tee -a "$OUT/summary.txt"
    return 124
  fi
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  return $rc
}

: > "$OUT/summary.txt"
{ nvidia-smi; python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__,
'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1

phase build 240 make build
# tests: 8 workers share the GPU; the build has just compiled every .cu for sm_90a, so the compile
# check only adds sm_80
TEST_LIMIT=$(($(left) - 200))
[ "$TEST_LIMIT" -gt 300 ] && TEST_LIMIT=300
phase test "$TEST_LIMIT" make test PYTEST_ARGS="-n 8 --durations=30" CUDA_CHECK_ARGS="--arch sm_80"
BENCH_LIMIT=$(($(left) - 20))
ARGS=${BENCH_ARGS:-}
[ "$BENCH_LIMIT" -lt 240 ] && [ -z "$ARGS" ] && ARGS="--quick"
phase bench "$BENCH_LIMIT" make bench BENCH_ARGS="$ARGS --no-progress"

results=$(ls -d benchmarks/results/*nvidia*/ 2>/dev/null || true)
[ -n "$results" ] && tar czf "$OUT/results.tar.gz" $results
echo "total $((SECONDS - START)) s" | tee -a "$OUT/summary.txt"
tail -n 4 "$OUT/test.log" 2>/dev/null
grep -E "target|MISSED|met$" "$OUT/bench.log" 2>/dev/null | tail -n 20
