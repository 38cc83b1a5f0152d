#!/usr/bin/env bash
# One device call on a lent GPU, everything in one prepared run that keeps what it finished:
#   bash benchmarks/gpu_speedrun.sh [N_SEEDS] [more gpu_speedrun.py args]
#   LEAVE_ONE_OUT=1 bash benchmarks/gpu_speedrun.sh 5      # then Page's leave-one-out rows with the time left
# Needs .gpu/ (made here by benchmarks/prepare_gpu.sh, carried with `carry: [".gpu"]`): the wheels the GPU
# machine lacks (Hydra, pydantic, airbench) and the CIFAR-10 archive. Installs nothing from the network.
#
# Order (each part bounded by its own timeout inside the device tool's 10 minutes, so partial results
# come back): the speedrun (airbench's own train94 first, then each recipe with the step captured as a
# CUDA graph, n seeds, and the op-by-op step's profiled run beside it; page_final's layout chosen by a
# profiled probe), the CUDA tests (a replay equals the uncaptured step; no host sync), then, with
# LEAVE_ONE_OUT=1, the leave-one-out rows seed-major until the call's time is spent (a second call
# completes them: .gpu/leave_one_out keeps the finished runs while the machine stays warm).
set -uo pipefail
cd "$(dirname "$0")/.."
CALL_START=$SECONDS
CALL_SECONDS="${CALL_SECONDS:-570}"   # the device tool allows 600 s a command
python3 -m pip install -q --no-index --no-deps --target .gpu-site .gpu/wheels/*.whl
export PYTHONPATH="$PWD/.gpu-site:$PWD/src:${PYTHONPATH:-}"
export CIFAR10_ARCHIVE="$PWD/.gpu/cifar10-jpeg-q75.tar.gz" CIFAR_SPEEDRUN_CACHE="$PWD/.gpu/cache"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv,noheader || true
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
# Only json, csv and logs go to $OUT (the device tool brings back 8 files at most); the runs' own
# folders stay on the machine.
OUT_DIR="${OUT:-$PWD/.gpu/out}"
mkdir -p "$OUT_DIR" .gpu/leave_one_out
filter() { grep -v -e "^💡 Tip" -e "available: " -e "LeafSpec" -e "Loading .train_dataloader" -e "Trainer.fit. stopped" \
  -e "Automatic Mixed Precision" -e "^\[data\]" -e "^\[optim\]" -e "^\[run\]" -e "^\[done\]" || true; }
timeout "${SPEEDRUN_TIMEOUT:-300}" python3 benchmarks/gpu_speedrun.py --seeds "${1:-5}" --out "$OUT_DIR" \
    --runs-dir "$PWD/.gpu/runs" --peer --precision bf16-mixed \
    --experiments airbench94 airbench94_muon page_final --step-modes graph eager --baseline-seeds 0 \
    --probe page_final channels_last=true channels_last=false "${@:2}" 2>&1 | tee "$OUT_DIR/gpu_speedrun.log" | filter
# The CUDA-only tests (skipped on CPU machines and in CI): the replay checks first.
timeout "${CUDA_TEST_TIMEOUT:-110}" python3 -m pytest -q -s -p no:cacheprovider \
    "tests/test_cuda.py::test_a_replayed_step_computes_what_the_step_computes_uncaptured" \
    "tests/test_cuda.py::test_training_steps_make_no_host_sync_on_cuda" 2>&1 \
    | tee "$OUT_DIR/test_cuda.log" | grep -E "largest relative|passed|failed|Error|assert" | tail -40 || true
if [ "${LEAVE_ONE_OUT:-0}" = "1" ]; then
    left=$(( CALL_SECONDS - (SECONDS - CALL_START) ))
    echo "leave-one-out: ${left}s left in this call"
    timeout "$(( left - 5 ))" python3 benchmarks/gpu_leave_one_out.py --seeds 0 1 2 \
        --csv .gpu/leave_one_out/leave_one_out_gpu.csv --budget-seconds "$(( left - 20 ))" 2>&1 \
        | tee "$OUT_DIR/leave_one_out.log" | filter
    cp .gpu/leave_one_out/leave_one_out_gpu.csv* "$OUT_DIR/" 2>/dev/null || true
fi
echo "call: $(( SECONDS - CALL_START ))s"
