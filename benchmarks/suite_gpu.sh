#!/usr/bin/env bash
# The benchmark suite on a GPU, with a small search for the fastest recipe to 99.0% there.
#   bash benchmarks/suite_gpu.sh MNIST_DIR OUT_DIR
# Each option set is added to `lenet5 train --recipe fast` (keras-lenet, Adam one-cycle, bf16).
set -uo pipefail
data=$1 out=$2
mkdir -p "$out"
fast() {  # name, options
  python benchmarks/suite.py --device cuda --data-dir "$data" --parts time_to_99 --seeds 3 \
    --fast-options "$2" --out "$out/gpu-fast-$1.json" 2>&1 | tee -a "$out/gpu.log"
}
fast b512 "--batch-size 512 --lr 1e-2 --epochs 2"
fast b1024 "--batch-size 1024 --lr 1.5e-2 --epochs 2"
python benchmarks/suite.py --device cuda --data-dir "$data" --parts training,keras_recipe,inference \
  --rounds 1 --images 60000 --out "$out/benchmarks-cuda.json" 2>&1 | tee -a "$out/gpu.log"
fast b512-compiled "--batch-size 512 --lr 1e-2 --epochs 2 --compile"
