#!/usr/bin/env bash
# Runs on the GPU machine (an H100 with a CUDA 13.0 driver, PyTorch+transformers+peft,
# no Rust, no network), from the repository root, with dist/retune-cuda built here by
# scripts/build-cuda.sh. Results go to $OUT (or ./gpu-out).
#
#   scripts/gpu/run.sh check    SMOLLM2_GGUF   # greedy tokens + logits vs the CPU engine, mixed adapters
#   scripts/gpu/run.sh retune   [DISTINCT]     # 8B-shaped model: retune-bench device (0,1,16,100 adapters)
#   scripts/gpu/run.sh peft     [DISTINCT]     # same model and adapters: transformers+peft peer
#
# Each part fits one 10-minute device call; `retune` and `peft` each write the
# random 8B model first (~16 GB + 100 adapters, about 2 minutes), since a device
# machine keeps nothing between calls.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
BIN=dist/retune-cuda
BENCH=dist/retune-bench-cuda
for b in "$BIN" "$BENCH"; do
  if [ ! -x "$b" ] && [ -f "$b.gz" ]; then
    gunzip -c "$b.gz" > "$b" && chmod +x "$b"
  fi
done
# CUDA 13 runtime libraries from the PyTorch wheels on that machine
libdirs=$(python3 - <<'PY'
import glob, os, site
seen = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for pat in ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13"):
        for f in glob.glob(os.path.join(sp, "nvidia", "**", pat), recursive=True):
            d = os.path.dirname(f)
            if d not in seen:
                seen.append(d)
print(":".join(seen))
PY
)
export LD_LIBRARY_PATH=${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
ldd "$BENCH" | grep -E "cuda|cublas|curand|not found" | tee -a "$OUT/device.txt"
part=${1:-}
shift || true
case "$part" in
  check)
    gguf=${1:?path to SmolLM2-135M-Instruct.Q4_1.gguf}
    for dt in f32 bf16; do
      "$BENCH" check-device --model "$gguf" --device cuda --dtype "$dt" --tokens 32 --mixed \
        2>&1 | tee "$OUT/check-$dt.txt" || true
    done
    ;;
  retune)
    python3 scripts/gpu/make_model.py --out /tmp/l8b --shape llama3-8b --adapters 100
    "$BENCH" device --model /tmp/l8b --device cuda --dtype bf16 --streams 64 \
      --prompt-tokens 128 --decode-tokens 128 --adapters-dir /tmp/l8b/adapters \
      --distinct "${1:-0,1,16,100}" --json "$OUT/retune.json" 2>&1 | tee "$OUT/retune.txt"
    ;;
  peft)
    python3 scripts/gpu/make_model.py --out /tmp/l8b --shape llama3-8b --adapters 100
    python3 scripts/gpu/peft_bench.py --model /tmp/l8b --streams 64 --prompt-tokens 128 \
      --decode-tokens 128 --distinct "${1:-0,1,16,100}" --json "$OUT/peft.json" 2>&1 | tee "$OUT/peft.txt"
    ;;
  *)
    echo "usage: $0 check GGUF | retune [DISTINCT] | peft [DISTINCT]" >&2
    exit 2
    ;;
esac
