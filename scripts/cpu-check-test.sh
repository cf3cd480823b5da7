#!/usr/bin/env bash
# The release build targets x86-64-v3: on an older CPU the binaries must say so
# and exit 1, not die of SIGILL. qemu-user emulates such a CPU (Westmere: SSE4.2,
# no AVX; SandyBridge: no AVX2) and, for contrast, one with every feature (max).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-x86_64 >/dev/null; then
  echo "cpu-check-test: qemu-x86_64 missing (Debian package qemu-user)" >&2
  exit 1
fi
bin=target/release/retune
# Westmere: no AVX at all; SandyBridge: AVX but no AVX2/FMA (what trips first)
for cpu in Westmere:avx SandyBridge:avx2; do
  model="${cpu%%:*}"; lacks="${cpu##*:}"
  set +e
  out="$(qemu-x86_64 -cpu "$model" "$bin" --version 2>&1)"; rc=$?
  set -e
  if [ "$rc" -ne 1 ] || ! grep -q "needs an x86-64-v3 CPU" <<<"$out" || ! grep -q "lacks $lacks" <<<"$out"; then
    echo "cpu-check-test: on a $model CPU expected exit 1 and the message, got rc=$rc: $out" >&2
    exit 1
  fi
done
out="$(qemu-x86_64 -cpu max "$bin" --version 2>&1)" || {
  echo "cpu-check-test: on a CPU with every feature retune --version failed: $out" >&2
  exit 1
}
echo "cpu-check-test: ok (old CPU refused with a message; $out on a full one)"
