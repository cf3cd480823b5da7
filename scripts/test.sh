#!/usr/bin/env bash
# The test suite: fetch (cached) model, then every workspace test in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
RETUNE_MODEL="$(./scripts/fetch-model.sh)"
RETUNE_GEMMA_MODEL="$(./scripts/fetch-model.sh gemma3)"
export RETUNE_MODEL RETUNE_GEMMA_MODEL
PGDIR=""
RUN_TMP=""
cleanup() {
  if [ -n "$PGDIR" ]; then ./scripts/pg-cluster.sh stop "$PGDIR"; rm -rf "$PGDIR"; fi
  if [ -n "$RUN_TMP" ]; then rm -rf "$RUN_TMP"; fi
}
trap cleanup EXIT
# the tests' scratch directories (models, registries, stores) go under TMPDIR:
# one throwaway directory per run, removed at the end (RETUNE_KEEP_TMP=1 keeps them)
if [ -z "${RETUNE_KEEP_TMP:-}" ]; then
  RUN_TMP="$(mktemp -d /tmp/retune-run.XXXXXX)"
  chmod 1777 "$RUN_TMP" # as /tmp: the private PostgreSQL clusters run as their own user
  export TMPDIR="$RUN_TMP"
fi
# a throwaway PostgreSQL cluster for the shared store suite (each test makes its own database)
if [ -z "${RETUNE_TEST_PG_URL:-}" ]; then
  PGDIR="$(mktemp -d /tmp/retune-pg.XXXXXX)"
  RETUNE_TEST_PG_URL="$(./scripts/pg-cluster.sh start "$PGDIR")"
  export RETUNE_TEST_PG_URL
fi
cargo nextest run --workspace --release --no-fail-fast "$@"
cargo build --release -q -p retune-server --bin retune -p retune-trainer --bin retune-trainer
./scripts/cpu-check-test.sh
./scripts/openai-client-test.sh
./scripts/k8s-check.sh
./scripts/image-check.sh
