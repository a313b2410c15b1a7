#!/usr/bin/env bash
# The 1998 reproduction over 5 seeds, plain and with distortions, all 10 runs at once (one core
# each; per-pattern training is single-threaded). Needs 10 free cores and a C++ compiler.
#   bash docs/scripts/lecun1998_seeds.sh MNIST_DIR OUT_DIR
set -uo pipefail
data=$1 out=$2
mkdir -p "$out"
lscpu | grep -m1 "Model name"; nproc
python3 -c "from lenet5.native import sdlm_pass; assert sdlm_pass.available(), sdlm_pass.why_unavailable(); print('native per-pattern pass: ok')" || exit 3
runs=$(mktemp -d)
python3 -m lenet5 reproduce lecun1998 --seeds 5 --jobs 5 --threads 1 --data-dir "$data" --offline \
  --out-dir "$runs" --name plain &
python3 -m lenet5 reproduce lecun1998 --distortions --seeds 5 --jobs 5 --threads 1 --data-dir "$data" --offline \
  --out-dir "$runs" --name distortions &
wait
for v in plain distortions; do cp "$runs/$v/summary.md" "$out/$v-summary.md"; cp "$runs/$v/summary.json" "$out/$v-summary.json"; done
tar -czf "$out/runs.tar.gz" -C "$runs" --exclude='*.pt' --exclude='*.safetensors' .
