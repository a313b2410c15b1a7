#!/usr/bin/env bash
# On a GPU machine: the recipe search for lenet5-modern (docs/scripts/modern_search.py), then the
# `fast` recipe's time to 99% through the refactored loop as a check of the CUDA path.
#   bash docs/scripts/gpu_modern_search.sh MNIST_DIR OUT_DIR
set -uo pipefail
data=$1 out=$2
mkdir -p "$out"
nvidia-smi -L
python3 -m lenet5 train --recipe fast --stop-at 0.99 --device cuda --data-dir "$data" --out-dir /tmp/fast-runs \
  --name fast 2>&1 | tail -4 | tee "$out/fast-cuda.txt"
python3 docs/scripts/modern_search.py --device cuda --data-dir "$data" --jobs 16 --threads 1 --seeds 0 1 \
  --out "$out" --runs /tmp/modern-runs
