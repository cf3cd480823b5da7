#!/usr/bin/env bash
# Fetch the model (cached) and run it on a prompt with the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="$(./scripts/fetch-model.sh)"
PROMPT="${*:-Classify this support ticket in one word: my card was charged twice.}"
cargo run --release -q -p retune-server --bin retune -- generate --model "$MODEL" "$PROMPT"
