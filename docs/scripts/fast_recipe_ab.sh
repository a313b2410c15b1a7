#!/usr/bin/env bash
# `lenet5 train --recipe fast` at an older commit (A) and in this checkout (B), interleaved per
# seed in one session, so both meet the same machine state; optionally as an emulated CPU class.
#
#   bash docs/scripts/fast_recipe_ab.sh OLD_COMMIT [SEEDS] [CLASS]   # e.g. 3b0a317 3 avx2
#
# Needs the MNIST files in ../shared/mnist (or $MNIST_DIR) and this checkout's environment
# (python with lenet5's dependencies: $PYTHON, default .venv/bin/python).
set -euo pipefail
old=${1:?usage: fast_recipe_ab.sh OLD_COMMIT [SEEDS] [CLASS]}
seeds=${2:-3}
class=${3:-}
repo=$(git rev-parse --show-toplevel)
python=${PYTHON:-$repo/.venv/bin/python}
mnist=${MNIST_DIR:-$repo/../shared/mnist}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$repo" worktree add --detach "$work/old" "$old" >/dev/null 2>&1
if [ -n "$class" ]; then  # the variables of lenet5.hardware.EMULATE[class]
  eval "$("$python" -c "import sys; from lenet5.hardware import EMULATE; print(' '.join(f'export {k}={v}' for k, v in EMULATE[sys.argv[1]].items()))" "$class")"
fi
echo "A = $old, B = $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet || echo +changes); class ${class:-as it is}"
for ((seed = 0; seed < seeds; seed++)); do
  for side in A B; do
    src=$repo/src
    [ "$side" = A ] && src=$work/old/src
    log=$work/$side-$seed.log
    start=$(date +%s.%N)
    PYTHONPATH=$src "$python" -m lenet5 train --recipe fast --data-dir "$mnist" --offline \
        --out-dir "$work/runs" --name "$side-$seed" --seed "$seed" >"$log" 2>&1 || { cat "$log"; exit 1; }
    end=$(date +%s.%N)
    printf '%s seed %d: %5.1f s wall, %s, %s\n' "$side" "$seed" "$(echo "$end - $start" | bc)" \
        "$(grep -o 'model [a-z0-9-]*' "$log" | head -1)" "$(grep -o 'test accuracy [0-9.]*%' "$log")"
  done
done
