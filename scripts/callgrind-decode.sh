#!/usr/bin/env bash
# Instruction counts of single-stream decode, per kernel path, under callgrind:
# repeatable for the same binary, model and inputs whatever else the machine is
# doing (time is not: compare seconds only within one run).
#
#   cargo build --release -p retune-server
#   scripts/callgrind-decode.sh [MODEL] [TOKENS]
#
# One thread (RAYON_NUM_THREADS=1), greedy, a 4-token raw prompt; only
# `Model::forward` is counted (the prefill of the prompt and TOKENS-1 decode
# steps), so loading, packing and hashing the weights are left out. Prints, per
# path, the instructions per forward call and the functions that take them
# (inlined code counted in the function it was inlined into).
# Valgrind 3.19 does not run AVX-512 code (its CPUID hides AVX-512), so only the
# AVX2 paths (f32 and int8 activations) can be counted here; the others are
# reported as not available.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-$(scripts/fetch-model.sh)}"
TOKENS="${2:-17}"
BIN=target/release/retune
OUT="${CALLGRIND_OUT:-$(mktemp -d)}"; mkdir -p "$OUT"
paths=$(RETUNE_KERNELS=none "$BIN" generate --model "$MODEL" --max-tokens 1 --raw "a" 2>&1 \
  | sed -n 's/.*not available here (\(.*\)); using.*/\1/p')
[ -n "$paths" ] || paths="AVX2"
echo "kernel paths on this machine: $paths"
for p in avx2 avx2int8 avx512 avx512vnni; do
  RETUNE_KERNELS=$p RAYON_NUM_THREADS=1 valgrind --tool=callgrind \
    --callgrind-out-file="$OUT/callgrind.$p" \
    --toggle-collect='retune_engine::model::Model::forward' \
    "$BIN" generate --model "$MODEL" --max-tokens "$TOKENS" --raw "Once upon a time" \
    >"$OUT/$p.log" 2>&1 || { echo "$p: not run (see $OUT/$p.log)"; continue; }
  if grep -q "is not available here" "$OUT/$p.log"; then
    echo "$p: not available on this CPU"
    continue
  fi
  callgrind_annotate --inclusive=no --auto=no "$OUT/callgrind.$p" 2>/dev/null | python3 -c '
import re, sys, collections
tokens, path = int(sys.argv[1]), sys.argv[2]
total, by, listing = 0, collections.Counter(), False
for line in sys.stdin:
    if "file:function" in line:
        listing = True
    m = re.match(r"^\s*([0-9,]+) \(\s*[0-9.]+%\)\s+(.*)$", line)
    if not m:
        continue
    n, what = int(m.group(1).replace(",", "")), m.group(2)
    if "PROGRAM TOTALS" in what:
        total = n
        continue
    if not listing:
        continue
    what = re.sub(r"\s*\[[^]]*\]\s*$", "", what)
    fn = what.split(":", 1)[1] if ":" in what else what  # drop the source file of inlined code
    by[re.sub(r"<[^<>]*>", "", fn).strip()] += n
print(f"== {path}: {total:,} instructions in {tokens} forward calls, {total // max(tokens, 1):,} per call")
for fn, n in by.most_common(10):
    print(f"  {100 * n / max(total, 1):5.1f}%  {n // max(tokens, 1):>13,} per call  {fn[:110]}")
' "$TOKENS" "$p"
done
echo "callgrind files: $OUT"
