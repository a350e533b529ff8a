#!/usr/bin/env bash
# The GPU test suite (`-m gpu`) on the device machine, in two lanes when two GPUs are visible
# (nvidia-h200-x2: the lanes run side by side), one lane otherwise; each lane under a time
# limit (LIMIT seconds, default 500), its log under $OUT (gpu-tests-lane0.log, -lane1.log).
#
#   bash scripts/gpu_suite.sh                 # from the repository root, on the GPU machine
#   LIMIT=250 bash scripts/gpu_suite.sh       # a shorter call
#
# Autotuning is off (UNSLOTH_LORA_AUTOTUNE=0: the first tile only), so that the suite fits one
# 10-minute call; the autotuned paths are covered by the benches.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_env.sh
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
KERNELS="tests/kernels/test_kernels_lora_linear.py tests/kernels/test_kernels_lowrank_thin.py tests/ops/test_edge_shapes.py"
FEATURES="tests/fp8/test_fp8_training.py tests/passes/test_attention_pass.py tests/sparsity/test_sparsity_training.py
          tests/passes/test_compress_saved.py tests/ops/test_linear_cross_entropy.py tests/ops/test_logits_cross_entropy.py
          tests/test_cudagraphs_gpu.py tests/bench/test_bench.py"

lane() {  # lane GPU_INDEX FILES...
    local gpu=$1 log="$OUT/gpu-tests-lane$1.log"
    shift
    CUDA_VISIBLE_DEVICES=$gpu UNSLOTH_LORA_AUTOTUNE=0 timeout "${LIMIT:-500}" \
        $PY -m pytest -q -m gpu "$@" --tb=short -p no:warnings > "$log" 2>&1
    echo "rc=$? (124: cut by the time limit)" >> "$log"
}

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    lane 0 $KERNELS &
    lane 1 $FEATURES &
    wait
else
    lane 0 $KERNELS $FEATURES
fi
for log in "$OUT"/gpu-tests-lane*.log; do echo "== $log"; tail -3 "$log"; done
