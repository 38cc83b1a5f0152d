#!/usr/bin/env bash
# One device call on a lent GPU: bash benchmarks/gpu_speedrun.sh [N_SEEDS] [more gpu_speedrun.py args]
# Needs .gpu/ (made here by benchmarks/prepare_gpu.sh, carried with `carry: [".gpu"]`): the Hydra
# wheels the GPU machine lacks and the CIFAR-10 archive. Installs nothing from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target .gpu-site .gpu/wheels/*.whl
export PYTHONPATH="$PWD/.gpu-site:$PWD/src:${PYTHONPATH:-}"
export CIFAR10_ARCHIVE="$PWD/.gpu/cifar10-jpeg-q75.tar.gz" CIFAR_SPEEDRUN_CACHE="$PWD/.gpu/cache"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Only gpu_speedrun.json and the log go to $OUT (the device tool brings back 8 files at most); the
# runs' own folders stay on the machine.
OUT_DIR="${OUT:-$PWD/.gpu/out}"
mkdir -p "$OUT_DIR"
# Own timeout, inside the device tool's 10-minute limit, so partial results still come back.
timeout "${SPEEDRUN_TIMEOUT:-510}" python3 benchmarks/gpu_speedrun.py --seeds "${1:-5}" --out "$OUT_DIR" \
    --runs-dir "$PWD/.gpu/runs" "${@:2}" 2>&1 | tee "$OUT_DIR/gpu_speedrun.log" \
    | grep -v -e "^💡 Tip" -e "available: " -e "LeafSpec" -e "Loading .train_dataloader" || true
# The CUDA-only tests (skipped on CPU machines and in CI), in what time is left.
timeout "${CUDA_TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 \
    | tee "$OUT_DIR/test_cuda.log" | tail -5 || true
