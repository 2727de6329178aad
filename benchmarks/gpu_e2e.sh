#!/usr/bin/env bash
# The one prepared end-to-end GPU run (results go to benchmarks/RESULTS.md): for a
# Qwen2.5-1.5B and a Llama-3.1-8B shape (bf16, --load-format dummy, configs written here):
# copy bandwidth; decode step time at B = 64, 256, context 1k, against the roofline, with a
# profile by op category; offline throughput (1024 in / 128 out, 128 in / 1024 out) with
# start-up, compile time and compilations after warm-up; HF generate (static batches, SDPA)
# on the same card for the ratio; serving TTFT / TPOT at 8 and 64 clients. Each step runs
# under its own timeout within GPU_E2E_BUDGET seconds (420). From the repo root:
#   bash benchmarks/gpu_e2e.sh [STEP ...]   STEP in: configs bandwidth decode throughput hf
#                                           serving report (default: all, in that order)
# Writes run.log, bandwidth.md, decode.md, throughput.md, serving.md and results.json under
# $OUT. Packages the GPU image lacks travel as wheels in .whl/ (benchmarks/gpu_e2e_wheels.sh
# fetches them here; the device call carries ".whl"). GPU_E2E_TINY=1: tiny configs and
# short lengths on whatever device jax has (the CPU dry run, tests/benchmarks/).
# GPU_E2E_PLAN=1: print each step's command (one line, shell-quoted) instead of running it.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_e2e}
WORK=${GPU_E2E_WORK:-/tmp/gpu_e2e_work}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK/results"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log="$OUT/run.log"
deadline=$((SECONDS + ${GPU_E2E_BUDGET:-420}))
steps=${*:-configs bandwidth decode throughput hf serving report}
models="qwen2.5-1.5b llama-3.1-8b"
cache="$WORK/jax-cache"
if [ -n "${GPU_E2E_TINY:-}" ]; then
  tiny=--tiny batches="4 8" ctx=32 dsteps=4 psteps=2 seqs=8 tokens=64 maxlen=256
  workloads="32x8 8x32" nprompts=8 nhf=4 clients="2 4" serve_in=16 serve_out=8 bw=$((64 << 20))
  t_cfg=120 t_decode=240 t_tput=240 t_hf=240 t_serve=300
else
  tiny="" batches="64 256" ctx=1024 dsteps=32 psteps=8 seqs=256 tokens=512 maxlen=2048
  workloads="1024x128 128x1024" nprompts=256 nhf=64 clients="8 64" serve_in=1024
  serve_out=128 bw=$((2 << 30))
  t_cfg=90 t_decode=150 t_tput=120 t_hf=120 t_serve=150
  # JAX takes 75% of the card by default and the engine sizes its KV pool from that: the 8B
  # shape's B = 256 x 1k needs ~36 GB of pool beside its 16 GB of weights
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
fi
engine="--max-num-seqs $seqs --max-num-batched-tokens $tokens --max-model-len $maxlen"

# run NAME SECONDS CMD...: logged, under min(SECONDS, what the budget has left)
run() {
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_E2E_PLAN:-}" ]; then printf 'PLAN %s:' "$name"; printf ' %q' "$@"; echo; return; fi
  local left=$((deadline - SECONDS))
  [ "$name" != report ] && left=$((left - 20))  # the report always gets its turn
  if [ "$left" -lt 15 ]; then echo "=== $name: skipped, budget spent" | tee -a "$log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (timeout ${limit}s, $((SECONDS))s in)" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$log"
}

if [ -d .whl ] && [ -z "${GPU_E2E_TINY:-}${GPU_E2E_PLAN:-}" ]; then  # see benchmarks/gpu_e2e_wheels.sh
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl && export PYTHONPATH=$PYTHONPATH:$WORK/site
fi
run versions 60 bash -c "nvidia-smi --format=csv,noheader \
  --query-gpu=name,driver_version,memory.total 2>/dev/null || echo 'no nvidia-smi';
  $PY -c 'import jax, jaxlib, flax, transformers, torch; print(\"jax\", jax.__version__,
    \"jaxlib\", jaxlib.__version__, \"flax\", flax.__version__, \"transformers\",
    transformers.__version__, \"torch\", torch.__version__, jax.devices())';
  $PY -c 'import jaxserve.entrypoints.openai.api_server; print(\"jaxserve imports\")'"
for step in $steps; do
  case $step in
    configs) run configs $t_cfg $PY benchmarks/e2e_configs.py "$WORK/models" $tiny ;;
    bandwidth) run bandwidth 60 $PY benchmarks/e2e_bandwidth.py --bytes $bw \
      --out-md "$OUT/bandwidth.md" --output-json "$WORK/results/bandwidth.json" ;;
    decode) rm -f "$OUT/decode.md"; for m in $models; do
      run "decode $m" $t_decode $PY benchmarks/e2e_decode.py --model "$WORK/models/$m" \
        --batch-sizes $batches --context $ctx --steps $dsteps --profile-steps $psteps \
        $engine --compilation-cache-dir "$cache" --bandwidth-bytes $bw \
        --bandwidth-json "$WORK/results/bandwidth.json" --out-md "$OUT/decode.md" \
        --output-json "$WORK/results/decode_$m.json"; done ;;
    throughput|hf) for m in $models; do for w in $workloads; do
      if [ $step = hf ]; then n=$nhf; backend=hf; flags="--hf-max-batch-size $nhf"
      else n=$nprompts; backend=jaxserve
        flags="$engine --compilation-cache-dir $cache"; fi
      run "$step $m $w" $([ $step = hf ] && echo $t_hf || echo $t_tput) \
        $PY benchmarks/benchmark_throughput.py --backend $backend --model "$WORK/models/$m" \
        --load-format dummy --dtype bfloat16 --dataset-name random --input-len ${w%x*} \
        --output-len ${w#*x} --num-prompts $n $flags \
        --output-json "$WORK/results/${step}_${m}_$w.json"; done; done ;;
    serving) port=18400; for m in $models; do port=$((port + 1))
      serve_log="$WORK/server_$m.log"
      if [ -z "${GPU_E2E_PLAN:-}" ] && [ $((deadline - SECONDS)) -lt 60 ]; then
        echo "=== serving $m: skipped, budget spent" | tee -a "$log"; continue; fi
      serve=($PY -m jaxserve.entrypoints.cli serve "$WORK/models/$m" --port $port
             --load-format dummy --dtype bfloat16 $engine --no-background-compilation
             --compilation-cache-dir "$cache")
      if [ -n "${GPU_E2E_PLAN:-}" ]; then printf 'PLAN server %s:' $m; printf ' %q' "${serve[@]}"
        echo; else "${serve[@]}" > "$serve_log" 2>&1 & server=$!; fi
      for c in $clients; do  # one server per model; the first run waits for it to be ready
        # (the client on the CPU: a second process taking the GPU would starve the server)
        run "serving $m c=$c" $t_serve env JAX_PLATFORMS=cpu $PY \
          benchmarks/benchmark_serving.py --model "$WORK/models/$m" --base-url http://127.0.0.1:$port --num-prompts $((c * 4)) \
          --max-concurrency $c --input-len $serve_in --output-len $serve_out \
          --launch-timeout $t_serve --output-json "$WORK/results/serving_${m}_c$c.json"
      done
      [ -n "${GPU_E2E_PLAN:-}" ] && continue
      kill $server; for _ in $(seq 30); do kill -0 $server 2>/dev/null || break; sleep 1; done
      kill -9 $server 2>/dev/null; wait $server; tail -n 5 "$serve_log" >> "$log"
    done ;;
    report) run report 60 $PY benchmarks/e2e_report.py "$WORK/results" "$OUT" ;;
    *) echo "unknown step $step" | tee -a "$log" ;;
  esac
done
[ -n "${GPU_E2E_PLAN:-}" ] && exit 0
echo "=== summary ($SECONDS s)"
for f in bandwidth decode throughput serving; do [ -f "$OUT/$f.md" ] && cat "$OUT/$f.md"; done
exit 0
