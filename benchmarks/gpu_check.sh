#!/usr/bin/env bash
# One call on a lent GPU machine: environment, the Triton kernel tests compiled on CUDA
# (interpreter-sized and `gpu`-marked), the kernel speed benchmark, and a short CUDA autotune.
# Why one script: device time is short and every machine start costs minutes, so everything
# that needs the GPU runs in one command, each step under its own time limit, with logs and
# results written under $OUT (the benchmark rewrites its JSON after every row, so a step cut
# short still leaves what it measured).
#
#   OUT=/tmp/out TEST_S=200 BENCH_S=220 TUNE_S=60 bash benchmarks/gpu_check.sh
#   OUT=/tmp/out STEPS="tuned" TUNED_S=540 bash benchmarks/gpu_check.sh
#
# STEPS (default "tests bench autotune"): tests = the kernel tests; bench = kernel_speed.py
# with default configs (no torch.compile baselines); autotune = `rewriter autotune` on CUDA;
# tuned = kernel_speed.py --tune merged into the committed result of this GPU
# (benchmarks/results/kernel_speed-<gpu>.json): the attention groups with torch.compile
# baselines, then the norms with what time is left, all within TUNED_S seconds; graph =
# kernel_speed.py --cuda-graph --tune (the GPU's time without host launch overhead).
#
# Python packages the machine lacks (optuna and its needs, platformdirs) come as wheels in .whl/.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder for logs and results}
TEST_S=${TEST_S:-200}; BENCH_S=${BENCH_S:-220}; TUNE_S=${TUNE_S:-60}; TUNED_S=${TUNED_S:-540}
STEPS=${STEPS:-tests bench autotune}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
export REWRITER_CACHE_DIR=$OUT/cache

step() { echo; echo "=== $1 ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton, optuna; print('torch', torch.__version__, 'triton', triton.__version__, 'optuna', optuna.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))" || exit 1

if has tests; then
step "kernel tests on CUDA (limit ${TEST_S}s)"
timeout -k 10 "$TEST_S" python3 -m pytest -m "" -q -n 12 -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/kernel_tests.xml" \
  tests/kernels/test_norm_triton.py tests/kernels/test_linear_attention_triton.py \
  tests/kernels/test_sliding_window_triton.py tests/kernels/test_grid_window_triton.py \
  tests/kernels/test_agent_attention_triton.py tests/kernels/test_dispatch_gpu.py \
  2>&1 | tee "$OUT/kernel_tests.log" | tail -60
echo "pytest exit: ${PIPESTATUS[0]}"
fi

if has bench; then
step "kernel speed (start no case after ${BENCH_S}s)"
timeout -k 10 "$((BENCH_S + 120))" python3 benchmarks/kernel_speed.py --no-compile --budget-s "$BENCH_S" \
  --only sliding_window neighborhood swin agent_attention linear_attention norms --out-dir "$OUT" \
  2>&1 | tee "$OUT/kernel_speed.log" | tail -40
echo "kernel_speed exit: ${PIPESTATUS[0]}"
fi

if has autotune; then
step "autotune on CUDA (limit ${TUNE_S}s)"
timeout -k 10 "$TUNE_S" python3 -m rewriter.cli autotune --device cuda --trials 6 --budget "$((TUNE_S - 20))" \
  --kernels sliding_window_attention neighborhood_attention_2d --json > "$OUT/autotune.json" 2> "$OUT/autotune.log"
echo "autotune exit: $?"; tail -5 "$OUT/autotune.log"; head -c 3000 "$OUT/autotune.json"
fi

if has graph; then  # the GPU's own time (CUDA graph replays), default and tuned configs, no torch.compile
  step "kernel speed, CUDA graphs, tuned (limit ${GRAPH_S:-280}s)"
  timeout -k 10 "${GRAPH_S:-280}" python3 benchmarks/kernel_speed.py --cuda-graph --no-compile --tune 8 \
    --tune-budget-s 15 --budget-s "$((${GRAPH_S:-280} * 2 / 3))" --out-dir "$OUT" \
    --only sliding_window neighborhood swin linear_attention agent_attention norms \
    2>&1 | tee "$OUT/kernel_speed_graph.log" | tail -30
  echo "kernel_speed exit: ${PIPESTATUS[0]}"
fi

if has tuned; then
  start=$SECONDS
  cp benchmarks/results/kernel_speed-*.json "$OUT/" 2>/dev/null  # --merge keeps the other groups' rows
  step "kernel speed, attention, tuned (limit $((TUNED_S * 2 / 3))s)"
  timeout -k 10 "$((TUNED_S * 2 / 3))" python3 benchmarks/kernel_speed.py --merge --tune 10 --tune-budget-s 25 \
    --budget-s "$((TUNED_S / 2))" --only sliding_window neighborhood swin linear_attention agent_attention \
    --out-dir "$OUT" 2>&1 | tee "$OUT/kernel_speed_attention.log" | tail -12
  echo "kernel_speed exit: ${PIPESTATUS[0]}"
  left=$((TUNED_S - (SECONDS - start)))
  step "kernel speed, norms, tuned (limit ${left}s)"
  timeout -k 10 "$left" python3 benchmarks/kernel_speed.py --merge --tune 8 --tune-budget-s 15 --no-compile \
    --budget-s "$((left * 2 / 3))" --only norms --out-dir "$OUT" 2>&1 | tee "$OUT/kernel_speed_norms.log" | tail -30
  echo "kernel_speed exit: ${PIPESTATUS[0]}"
fi
step done
