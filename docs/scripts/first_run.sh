#!/usr/bin/env bash
# A user's very first `lenet5 train --recipe fast`: process wall time with an empty cache (so the
# native kernels are compiled and the bf16 probe runs, once), in alternating rounds with BEFORE's
# lenet5 (a worktree, same interpreter) when one is named. Prints wall seconds, the test accuracy
# the run ended at, and its epochs.
#
#   bash docs/scripts/first_run.sh [ROUNDS]            # default 2
#   BEFORE=HEAD~1 bash docs/scripts/first_run.sh 2
#   CPU_CLASS=avx2 BEFORE=HEAD~1 bash docs/scripts/first_run.sh 2   # as an AVX2-only CPU (lenet5.hardware.EMULATE)
#
# Needs the MNIST files in ../shared/mnist (or $MNIST_DIR).
set -euo pipefail
rounds=${1:-2}
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
mnist=${MNIST_DIR:-$repo/../shared/mnist}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/before" 2>/dev/null || true; rm -rf "$work"' EXIT
if [[ -n "${CPU_CLASS:-}" ]]; then  # the caps, exported to every process below
  eval "$("$python" -c "import shlex, sys; from lenet5.hardware import EMULATE
print(' '.join(f'export {k}={shlex.quote(v)}' for k, v in EMULATE[sys.argv[1]].items()))" "$CPU_CLASS")"
fi
if [[ -n "${BEFORE:-}" ]]; then
  git -C "$repo" worktree add --detach "$work/before" "$BEFORE" >/dev/null 2>&1
  echo "# before: $(git -C "$repo" rev-parse --short "$BEFORE") (lines 'before')"
fi
echo "# $(git -C "$repo" rev-parse --short HEAD), $(date -u +%FT%TZ), $(nproc) cores, class ${CPU_CLASS:-native};" \
     "$("$python" -c 'from lenet5.hardware import cpu_class, matmul_peak; print(round(matmul_peak() / 1e9), "GFLOP/s fp32 matmul peak, flags class", cpu_class())')"
first_run() {  # first_run [before]
  local start end src=$repo/src label=${1:-now} cache
  [[ "$label" == before ]] && src=$work/before/src
  cache=$(mktemp -d -p "$work")
  start=$(date +%s.%N)
  PYTHONPATH="$src" XDG_CACHE_HOME="$cache" "$python" -m lenet5 train --recipe fast --data-dir "$mnist" --offline \
      --quiet --out-dir "$cache" --name run >/dev/null
  end=$(date +%s.%N)
  echo "$label $(echo "$end - $start" | bc) s, $("$python" -c "import json, sys; m = json.load(open(sys.argv[1]))
print(m['test_acc'], 'after', m['epochs'], 'epochs')" "$cache/run/metrics.json")"
}
for ((r = 0; r < rounds; r++)); do
  if [[ -z "${BEFORE:-}" ]]; then first_run
  elif ((r % 2 == 0)); then first_run before; first_run
  else first_run; first_run before; fi
done
