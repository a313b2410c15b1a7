#!/usr/bin/env bash
# Load on `lenet5 serve` from wrk (a C load generator: apt-get install wrk), bounded to DURATION.
#   bash benchmarks/serve_wrk.sh CHECKPOINT [WORKERS=2] [CONNECTIONS=4] [DURATION=10s]
# MNIST test digit 0 as a PNG body; prints wrk's latency distribution and requests/second.
set -euo pipefail
checkpoint=$1 workers=${2:-2} connections=${3:-4} duration=${4:-10s}
here=$(cd "$(dirname "$0")" && pwd)
body=$(mktemp --suffix=.png)
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python - "$body" <<'PY'
import io, sys
from PIL import Image
from lenet5.data import load_mnist
Image.fromarray(load_mnist(download=False).test.images[0].numpy()).save(sys.argv[1], "PNG")
PY
python -m lenet5 serve "$checkpoint" --port "$port" --workers "$workers" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$body"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
curl -sf -X POST -H 'Content-Type: image/png' --data-binary @"$body" "http://127.0.0.1:$port/v1/predict" >/dev/null
echo "lenet5 serve $checkpoint --workers $workers; wrk -t1 -c$connections -d$duration"
LENET5_WRK_BODY=$body wrk -t1 -c"$connections" -d"$duration" --latency -s "$here/predict.lua" "http://127.0.0.1:$port/v1/predict"
