#!/usr/bin/env bash
# The official openai Python package against a real `retune serve` on the real model.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${RETUNE_MODEL:-$(./scripts/fetch-model.sh)}"
VENV="${RETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retune}/venv-openai"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai==1.*"
fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
METRICS_KEY="metrics-$RANDOM$RANDOM"
METRICS_SHA=$(printf %s "$METRICS_KEY" | sha256sum | cut -d' ' -f1)
ADMIN_KEY="admin-$RANDOM$RANDOM"
ADMIN_SHA=$(printf %s "$ADMIN_KEY" | sha256sum | cut -d' ' -f1)
# a throwaway data root: the test uploads an adapter
DATA=$(mktemp -d)
RETUNE_SERVER__PORT=$PORT RETUNE_AUTH__METRICS_KEY_SHA256=$METRICS_SHA RETUNE_AUTH__ADMIN_KEY_SHA256=$ADMIN_SHA \
  RETUNE_ADAPTERS__ROOT="$DATA" ./target/release/retune serve --model "$MODEL" > "${TMPDIR:-/tmp}/retune-openai-test.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
"$VENV/bin/python" tests/openai_client/test_openai.py "http://127.0.0.1:$PORT" local smollm2-135m-instruct "$ADMIN_KEY"
# the metrics exposition passes promtool's checks
# /metrics is closed without the metrics key
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/metrics")" = 401 ]
curl -sf -H "Authorization: Bearer $METRICS_KEY" "http://127.0.0.1:$PORT/metrics" > "${TMPDIR:-/tmp}/retune-metrics.txt"
if command -v promtool >/dev/null; then
  promtool check metrics < "${TMPDIR:-/tmp}/retune-metrics.txt"
  echo "promtool check metrics: OK"
elif [ -n "${CI:-}" ]; then
  echo "promtool missing (Debian package prometheus)" >&2; exit 1
else
  echo "promtool not installed: skipped the metrics check (CI installs it)"
fi
