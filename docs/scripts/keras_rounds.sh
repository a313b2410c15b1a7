#!/usr/bin/env bash
# The blog post's run (`lenet5 train`, no options) against the Keras peer, in alternating rounds:
# lenet5, Keras, Keras, lenet5, lenet5, Keras, ... one process at a time; prints each process's
# wall seconds and lenet5's final test accuracy.
#
#   bash docs/scripts/keras_rounds.sh [ROUNDS] [TF_PYTHON]   # default 3, /opt/tfvenv/bin/python
#
# Needs the MNIST files in ../shared/mnist (or $MNIST_DIR) and an interpreter with TensorFlow.
set -euo pipefail
rounds=${1:-3}
tf_python=${2:-/opt/tfvenv/bin/python}
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
mnist=${MNIST_DIR:-$repo/../shared/mnist}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "# $(git -C "$repo" rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores; matmul peak:" \
     "$("$python" -c 'from lenet5.hardware import cpu_class, matmul_peak; print(round(matmul_peak() / 1e9), "GFLOP/s fp32, class", cpu_class())')"
lenet5() {
  local start end
  start=$(date +%s.%N)
  "$python" -m lenet5 train --data-dir "$mnist" --offline --quiet --out-dir "$work" --name "run-$1" >/dev/null
  end=$(date +%s.%N)
  echo "lenet5 $(echo "$end - $start" | bc) $("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['test_acc'])" "$work/run-$1/metrics.json")"
}
keras() {
  local start end
  start=$(date +%s.%N)
  "$tf_python" "$repo/benchmarks/peers/keras_lenet.py" --data-dir "$mnist" >/dev/null 2>&1
  end=$(date +%s.%N)
  echo "keras $(echo "$end - $start" | bc)"
}
for ((r = 0; r < rounds; r++)); do
  if ((r % 2 == 0)); then lenet5 "$r"; keras; else keras; lenet5 "$r"; fi
done
