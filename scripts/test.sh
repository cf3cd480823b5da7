#!/usr/bin/env bash
# The test suite: fetch (cached) model, then every workspace test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
RETUNE_MODEL="$(./scripts/fetch-model.sh)"
export RETUNE_MODEL
# a throwaway PostgreSQL cluster for the shared store suite (each test makes its own database)
if [ -z "${RETUNE_TEST_PG_URL:-}" ]; then
  PGDIR="$(mktemp -d /tmp/retune-pg.XXXXXX)"
  trap './scripts/pg-cluster.sh stop "$PGDIR"; rm -rf "$PGDIR"' EXIT
  RETUNE_TEST_PG_URL="$(./scripts/pg-cluster.sh start "$PGDIR")"
  export RETUNE_TEST_PG_URL
fi
cargo nextest run --workspace --release --no-fail-fast "$@"
cargo build --release -q -p retune-server --bin retune -p retune-trainer --bin retune-trainer
./scripts/cpu-check-test.sh
./scripts/openai-client-test.sh
./scripts/k8s-check.sh
./scripts/image-check.sh
