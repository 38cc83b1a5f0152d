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
OUT_DIR="${OUT:-$PWD/.gpu/out}"
# Own timeout, inside the device tool's 10-minute limit, so partial results still come back.
timeout "${SPEEDRUN_TIMEOUT:-540}" python3 benchmarks/gpu_speedrun.py --seeds "${1:-5}" --out "$OUT_DIR" "${@:2}" \
    2>&1 | tee "$OUT_DIR.log"
