#!/usr/bin/env bash
# The loop end to end on Banking77, on this machine: a tenant `bank` declares the
# task `banking77` (served by the base model with a prompt listing the 77 intents
# until a fine-tune beats it); 500 real completions are corrected through
# /v1/feedback and the rest of the train rows are imported; the trainer daemon
# snapshots, trains, gates (against base+prompt and the most common answer, on
# held-out rows of the snapshot) and promotes; 1,000 rows the loop never saw score
# the promoted adapter through the API. The data directory stays for you to query.
#   ./scripts/demo-banking77.sh [BANKING77_DIR]      (default ../shared/data/banking77)
# Environment: RETUNE_DEMO (default ./demo-banking77), TRAIN_MINUTES (default 25).
set -euo pipefail
cd "$(dirname "$0")/.."
B77="${1:-../shared/data/banking77}"
[ -f "$B77/train.csv" ] || { echo "no $B77/train.csv (Banking77, CC-BY-4.0)" >&2; exit 2; }
DEMO="$(mkdir -p "${RETUNE_DEMO:-demo-banking77}" && cd "${RETUNE_DEMO:-demo-banking77}" && pwd)"
[ -e "$DEMO/data/registry.db" ] && { echo "$DEMO already holds a demo: remove it or set RETUNE_DEMO" >&2; exit 2; }
MODEL="$(./scripts/fetch-model.sh)"
cargo build --release -q -p retune-server --bin retune -p retune-trainer --bin retune-trainer
python3 scripts/banking77.py split "$DEMO/split" --holdout 1000 --system "" --data "$B77"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key() { echo "rt-$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"; }
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
API_KEY="$(key)"; ADMIN_KEY="$(key)"
(umask 077; printf 'RETUNE_API_KEY=%s\nRETUNE_ADMIN_KEY=%s\n' "$API_KEY" "$ADMIN_KEY" > "$DEMO/keys.env")
PROMPT="$(python3 -c 'import json,sys; l=json.load(open(sys.argv[1])); print(json.dumps("Classify the customer message for a bank into exactly one of these intents and answer with the intent name only: " + ", ".join(l) + "."))' "$DEMO/split/labels.json")"
LABELS="$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$DEMO/split/labels.json")"
cat > "$DEMO/retune.toml" <<EOF
[server]
port = $PORT
[model]
path = "$MODEL"
id = "smollm2-135m-instruct"
[adapters]
root = "$DEMO/data"
[auth]
admin_key_sha256 = "$(sha "$ADMIN_KEY")"
[[tenants]]
name = "bank"
key_sha256 = ["$(sha "$API_KEY")"]
[trainer]
poll_seconds = 10
threads = 2
discover = false
[[trainer.adapters]]
tenant = "bank"
name = "banking77"
[trainer.adapters.trigger]
# every train row: the run starts once all of them are in
min_new_examples = $(wc -l < "$DEMO/split/train.jsonl")
min_examples = 100
# a declared label task: the trainer picks its own settings for it (a classifier)
[trainer.adapters.data]
labels = $LABELS
[trainer.adapters.train]
max_minutes = ${TRAIN_MINUTES:-25}
[trainer.adapters.gate]
system_prompt = $PROMPT
shots = 0
max_eval = 1000
rollout = "live"
EOF
LOG="$DEMO/logs"; mkdir -p "$LOG"
./target/release/retune serve --config "$DEMO/retune.toml" > "$LOG/server.log" 2>&1 &
SERVER=$!
RUST_LOG=info ./target/release/retune-trainer daemon --config "$DEMO/retune.toml" --holder demo > "$LOG/trainer.log" 2>&1 &
TRAINER=$!
trap 'kill $SERVER $TRAINER 2>/dev/null || true' EXIT
BASE="http://127.0.0.1:$PORT"
for _ in $(seq 1 300); do curl -sf "$BASE/ready" >/dev/null 2>&1 && break; sleep 0.2; done
T0=$(date +%s)
python3 scripts/demo_banking77.py feed "$BASE" "$DEMO/split" --api-key "$API_KEY" --admin-key "$ADMIN_KEY" --corrected 500
python3 scripts/demo_banking77.py wait "$BASE" --admin-key "$ADMIN_KEY" --timeout-min 120 | tee "$DEMO/run.txt"
echo "loop wall time (feed to promotion): $(( $(date +%s) - T0 )) s" | tee -a "$DEMO/run.txt"
python3 scripts/demo_banking77.py holdout "$BASE" "$DEMO/split" --api-key "$API_KEY" | tee -a "$DEMO/run.txt"
cat <<EOF

The promoted adapter is served as model "banking77" for tenant "bank":
  ./target/release/retune serve --config $DEMO/retune.toml
  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H "Authorization: Bearer \$(. $DEMO/keys.env; echo \$RETUNE_API_KEY)" \\
    -d '{"model": "banking77", "messages": [{"role": "user", "content": "my card has not arrived yet"}], "temperature": 0}'
One user message per request, no system message; the answer is one intent name.
Data (registry, adapter store, examples, snapshots): $DEMO/data; the run and gate: $DEMO/run.txt;
held-out rows the loop never saw: $DEMO/split/holdout.jsonl.
EOF
