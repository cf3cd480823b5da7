#!/usr/bin/env bash
# Does training yield to serving on a shared 2-core node? Serving's inter-token
# latency (4 streams, scripts/itl-bench.py) idle, while `retune-trainer train` runs as the
# daemon runs it (1 thread under SCHED_IDLE: the [trainer] defaults of scripts/run.sh; and at nice 10 only), and while
# it runs without the levers (all cores, nice 0). Needs a Banking77 split (scripts/banking77.py split).
#   ./scripts/trainer-yield-bench.sh SPLIT_DIR [SECONDS=60]
set -euo pipefail
cd "$(dirname "$0")/.."
SPLIT="$1"; SECS="${2:-60}"
MODEL="$(./scripts/fetch-model.sh)"
cargo build --release -q -p retune-server --bin retune -p retune-trainer --bin retune-trainer
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
RETUNE_SERVER__PORT=$PORT ./target/release/retune serve --model "$MODEL" > /tmp/yield-server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; pkill -f "out /tmp/yield-train" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break; sleep 0.2; done
bench() { python3 scripts/itl-bench.py "http://127.0.0.1:$PORT" local smollm2-135m-instruct 4 "$SECS"; }
train() { # $1 = nice, $2 = threads, $3 = scheduling policy (other | idle)
  rm -rf /tmp/yield-train
  chrt "--${3:-other}" 0 nice -n "$1" ./target/release/retune-trainer train --model "$MODEL" --data "$SPLIT/train.jsonl" --eval-percent 0 \
    --out /tmp/yield-train --threads "$2" --top-layers 8 --max-minutes 30 > /tmp/yield-train.log 2>&1 &
  TP=$!; sleep 20   # past loading and the first steps
}
echo "idle: $(bench)"
train 0 1 idle; echo "training, 1 thread, SCHED_IDLE: $(bench)"; kill $TP; wait $TP 2>/dev/null || true
train 10 1; echo "training, 1 thread, nice 10: $(bench)"; kill $TP; wait $TP 2>/dev/null || true
train 0 2; echo "training, 2 threads, nice 0: $(bench)"; kill $TP; wait $TP 2>/dev/null || true
