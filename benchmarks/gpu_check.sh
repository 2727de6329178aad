#!/usr/bin/env bash
# The one prepared GPU run for the attention kernels (results go to benchmarks/RESULTS.md):
# versions, the Triton kernel's correctness on the device, the benchmark table, the KV-write
# measurement, a small launch-config sweep and the fixed cost of a call. Writes run.log and
# the tables under $OUT. From the repo root on the GPU machine (about 4 minutes for all):
#   bash benchmarks/gpu_check.sh [STEP ...]   STEP in: check bench kv_write sweep floor
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
log="$OUT/run.log"
steps=${*:-check bench kv_write sweep floor}
bench=benchmarks/kernels/bench_ragged_paged_attention.py
run() { echo "=== $1" | tee -a "$log"; shift; "$@" 2>&1 | tee -a "$log"; }

run versions bash -c 'nvidia-smi --format=csv,noheader \
  --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem;
  python3 -c "import jax, jaxlib; print(\"jax\", jax.__version__, \"jaxlib\",
    jaxlib.__version__, jax.devices())";
  python3 -c "import triton; print(\"triton\", triton.__version__)"'
for step in $steps; do
  case $step in
    check) run check timeout 50 python3 benchmarks/kernels/check_gpu_kernel.py ;;
    bench) run bench timeout 160 python3 $bench --time-budget 125 --out "$OUT/bench.md" ;;
    kv_write) run kv_write timeout 35 python3 benchmarks/kernels/bench_kv_write.py \
      --out "$OUT/kv_write.md" ;;
    sweep) run sweep timeout 35 python3 $bench --sweep --time-budget 24 --out "$OUT/sweep.md" ;;
    floor) run floor timeout 30 python3 $bench --floor --out "$OUT/floor.md" ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== summary"
grep -h "checks passed" "$log"
for f in bench kv_write sweep floor; do [ -f "$OUT/$f.md" ] && cat "$OUT/$f.md"; done
exit 0
