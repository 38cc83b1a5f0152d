#!/usr/bin/env bash
# Copy what a lent GPU machine lacks into .gpu/ (ignored by git; < 64 MiB): the Hydra and pydantic
# wheels (../shared/wheels-gpu) and the CIFAR-10 archive. Then call the device tool with command
# `bash benchmarks/gpu_speedrun.sh 5` and carry [".gpu"].
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-$(cd .. && pwd)/shared}"
mkdir -p .gpu/wheels
cp "$SHARED"/wheels-gpu/*.whl .gpu/wheels/
cp "${CIFAR10_ARCHIVE:-$SHARED/cifar10/cifar10-jpeg-q75.tar.gz}" .gpu/
du -sh .gpu
