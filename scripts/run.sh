#!/usr/bin/env bash
# Fetch the model (cached) and start the OpenAI-compatible server on embedded
# defaults (127.0.0.1:8080, API key `local`). With arguments, generate once instead:
#   ./scripts/run.sh "your prompt"
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="$(./scripts/fetch-model.sh)"
cargo build --release -q -p retune-server --bin retune
if [ "$#" -gt 0 ]; then
  exec ./target/release/retune generate --model "$MODEL" "$*"
fi
exec ./target/release/retune serve --model "$MODEL"
