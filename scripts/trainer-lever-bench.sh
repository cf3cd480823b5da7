#!/usr/bin/env bash
# Needs /tmp/b77/sub320.jsonl (head -320 /tmp/b77/train.jsonl); never in CI.
# levers: backward only through the top 8 layers, and the frozen-layer cache, 2 epochs of 320 rows
set -e
M=${RETUNE_MODEL:-$HOME/.cache/retune/models/SmolLM2-135M-Instruct.Q4_1.gguf}
cd "$(dirname "$0")/.."
for cfg in "all:" "top8-nocache:--top-layers 8 --no-cache-frozen" "top8-cache:--top-layers 8"; do
  name=${cfg%%:*}; args=${cfg#*:}
  ./target/release/retune-trainer train --model $M --data /tmp/b77/sub320.jsonl --eval-percent 0 --out /tmp/lever-$name \
     --epochs 2 --batch-size 16 --threads 2 --checkpoint-every 0 --warmup 5 --lr 1e-3 --fresh $args | grep -E "trained|after"
done
