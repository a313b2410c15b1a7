#!/usr/bin/env bash
# The blog post's run (`lenet5 train`, no options) against the Keras peer, in alternating rounds:
# lenet5, Keras, Keras, lenet5, lenet5, Keras, ... one process at a time; prints each process's
# wall seconds and lenet5's final test accuracy. With BEFORE=<git revision>, that revision's lenet5
# (a worktree, same interpreter) also runs in every round, next to this one: a before/after in one go.
#
#   bash docs/scripts/keras_rounds.sh [ROUNDS] [TF_PYTHON]   # default 3, /opt/tfvenv/bin/python
#   BEFORE=HEAD~1 bash docs/scripts/keras_rounds.sh 3
#
# Needs the MNIST files in ../shared/mnist (or $MNIST_DIR) and an interpreter with TensorFlow.
set -euo pipefail
rounds=${1:-3}
tf_python=${2:-/opt/tfvenv/bin/python}
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
mnist=${MNIST_DIR:-$repo/../shared/mnist}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/before" 2>/dev/null || true; rm -rf "$work"' EXIT
warm='from lenet5 import native; assert native.available(), native.why_unavailable()'  # compile before the clock
"$python" -c "$warm"
if [[ -n "${BEFORE:-}" ]]; then
  git -C "$repo" worktree add --detach "$work/before" "$BEFORE" >/dev/null 2>&1
  PYTHONPATH="$work/before/src" "$python" -c "$warm"
  echo "# before: $(git -C "$repo" rev-parse --short "$BEFORE") (lines 'before')"
fi
echo "# $(git -C "$repo" rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores; matmul peak:" \
     "$("$python" -c 'from lenet5.hardware import cpu_class, matmul_peak; print(round(matmul_peak() / 1e9), "GFLOP/s fp32, class", cpu_class())')"
lenet5() {  # lenet5 NAME [label]: this checkout's lenet5, or with label "before" BEFORE's
  local start end src=$repo/src
  [[ "${2:-lenet5}" == before ]] && src=$work/before/src
  start=$(date +%s.%N)
  PYTHONPATH="$src" "$python" -m lenet5 train --data-dir "$mnist" --offline --quiet --out-dir "$work" \
      --name "run-$1" >/dev/null
  end=$(date +%s.%N)
  echo "${2:-lenet5} $(echo "$end - $start" | bc) $("$python" -c "import json, sys; print(json.load(open(sys.argv[1]))['test_acc'])" "$work/run-$1/metrics.json")"
}
ours() {  # this checkout's run, and BEFORE's beside it (in alternating order) when one is named
  if [[ -z "${BEFORE:-}" ]]; then lenet5 "$1"; elif ((r % 2 == 0)); then lenet5 "$1"; lenet5 "$1-before" before;
  else lenet5 "$1-before" before; lenet5 "$1"; fi
}
keras() {
  local start end
  start=$(date +%s.%N)
  "$tf_python" "$repo/benchmarks/peers/keras_lenet.py" --data-dir "$mnist" >/dev/null 2>&1
  end=$(date +%s.%N)
  echo "keras $(echo "$end - $start" | bc)"
}
for ((r = 0; r < rounds; r++)); do
  if ((r % 2 == 0)); then ours "$r"; keras; else keras; ours "$r"; fi
done
