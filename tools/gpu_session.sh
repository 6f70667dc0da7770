#!/usr/bin/env bash
# One well-planned call on the lent GPU machine (device tool `run`, carry [".whl"] after
# tools/fetch_anchor_wheels.sh): build with CUDA, `make test`, `make bench`, and leave the logs and
# the result files under $OUT (at most 8 files come back, two folders deep).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kxops-out}
mkdir -p "$OUT/results"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
make test 2>&1 | tee "$OUT/test.log" | tail -25
make bench BENCH_ARGS="${BENCH_ARGS:-}" 2>&1 | tee "$OUT/bench.log" | tail -60
for d in benchmarks/results/*/; do
  case "$d" in *nvidia*|*h100*|*h200*) cp -r "$d" "$OUT/results/" ;; esac
done
