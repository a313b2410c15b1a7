#!/usr/bin/env bash
# The benchmark suite on a GPU, plus a small search for the fastest recipe to 99.0% there.
#   bash benchmarks/suite_gpu.sh MNIST_DIR OUT_DIR
# Each option set below is added to `lenet5 train --recipe fast` (keras-lenet, Adam one-cycle, bf16).
set -uo pipefail
data=$1 out=$2
mkdir -p "$out"
python benchmarks/suite.py --device cuda --data-dir "$data" --parts time_to_99 --seeds 3 \
  --out "$out/gpu-fast-b128.json" 2>&1 | tee "$out/gpu.log"
python benchmarks/suite.py --device cuda --data-dir "$data" --parts time_to_99 --seeds 3 \
  --fast-options "--batch-size 256 --lr 8e-3 --epochs 2" --out "$out/gpu-fast-b256.json" 2>&1 | tee -a "$out/gpu.log"
python benchmarks/suite.py --device cuda --data-dir "$data" --parts time_to_99 --seeds 3 \
  --fast-options "--batch-size 512 --lr 1e-2 --epochs 2" --out "$out/gpu-fast-b512.json" 2>&1 | tee -a "$out/gpu.log"
python benchmarks/suite.py --device cuda --data-dir "$data" --parts training,keras_recipe,inference \
  --rounds 1 --images 60000 --out "$out/benchmarks-cuda.json" 2>&1 | tee -a "$out/gpu.log"
