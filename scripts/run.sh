#!/usr/bin/env bash
# Run the product on embedded defaults: the OpenAI-compatible server and the
# trainer sidecar on one local data directory (registry, adapter store, examples
# and datasets: ${RETUNE_DATA:-./data}); a tenant API key and an admin key are
# made on the first start and printed. With arguments, generate once instead:
#   ./scripts/run.sh "your prompt"
# Settings: $RETUNE_DATA/retune.toml (made on the first start; edit it freely),
# RETUNE_<SECTION>__<KEY> environment overrides as for `retune serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="$(./scripts/fetch-model.sh)"
cargo build --release -q -p retune-server --bin retune -p retune-trainer --bin retune-trainer
if [ "$#" -gt 0 ]; then
  exec ./target/release/retune generate --model "$MODEL" "$*"
fi
DATA="$(mkdir -p "${RETUNE_DATA:-data}" && cd "${RETUNE_DATA:-data}" && pwd)"
CFG="$DATA/retune.toml"
KEYS="$DATA/keys.env"
key() { echo "rt-$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"; }
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
if [ ! -f "$CFG" ]; then
  TENANT_KEY="$(key)"; ADMIN_KEY="$(key)"
  (umask 077; printf 'RETUNE_TENANT=local\nRETUNE_API_KEY=%s\nRETUNE_ADMIN_KEY=%s\n' "$TENANT_KEY" "$ADMIN_KEY" > "$KEYS")
  cat > "$CFG" <<EOF
# made by scripts/run.sh; the keys' plain text is in keys.env (mode 600)
[server]
host = "127.0.0.1"
port = ${PORT:-8080}
[model]
path = "$MODEL"
id = "smollm2-135m-instruct"
[adapters]
root = "$DATA"
[auth]
admin_key_sha256 = "$(sha "$ADMIN_KEY")"
[[tenants]]
name = "local"
key_sha256 = ["$(sha "$TENANT_KEY")"]
[trainer]
poll_seconds = 10
# one core for training; the trainer runs under SCHED_IDLE (priority = "idle"): serving keeps the CPU
threads = 1
EOF
fi
# shellcheck disable=SC1090
. "$KEYS"
./target/release/retune serve --config "$CFG" &
SERVER=$!
./target/release/retune-trainer daemon --config "$CFG" --holder "$(hostname)-local" &
TRAINER=$!
trap 'kill $SERVER $TRAINER 2>/dev/null || true; wait' EXIT INT TERM
PORT_NOW="$(sed -n 's/^port = //p' "$CFG" | head -1)"
cat <<EOF

retune is starting on http://127.0.0.1:${RETUNE_SERVER__PORT:-$PORT_NOW} (data in $DATA)
  tenant:    $RETUNE_TENANT
  API key:   $RETUNE_API_KEY      (OpenAI clients: base_url=http://127.0.0.1:${RETUNE_SERVER__PORT:-$PORT_NOW}/v1)
  admin key: $RETUNE_ADMIN_KEY    (/admin/..., and /metrics: -H "Authorization: Bearer <admin key>")
  model:     smollm2-135m-instruct, or an adapter's name once one is live
  trainer:   ./target/release/retune-trainer status --config $CFG
EOF
wait -n "$SERVER" "$TRAINER"
