#!/usr/bin/env bash
# Needs /work/pyenv (torch, peft) and /tmp/b77 from scripts/banking77.py split; never in CI.
# retune-trainer vs HF peft+torch (bf16 autocast and f32), same micro-batches, alternated, one session
set -e
M=${RETUNE_MODEL:-$HOME/.cache/retune/models/SmolLM2-135M-Instruct.Q4_1.gguf}
cd "$(dirname "$0")/.."
grep -m1 "model name" /proc/cpuinfo
[ -f /tmp/b77/batches.jsonl ] || ./target/release/retune-trainer tokenize --model $M --data /tmp/b77/train.jsonl --eval-percent 0 --batch-size 16 --out /tmp/b77/batches.jsonl
ours() { ./target/release/retune-trainer train --model $M --data /tmp/b77/train.jsonl --eval-percent 0 --out /tmp/speed-$1 --max-steps 30 --batch-size 16 --threads 2 --checkpoint-every 0 --warmup 30 --lr 5e-4 --fresh | grep -E "trained|after"; }
peer() { /work/pyenv/bin/python scripts/peft-train-bench.py --model $M --batches /tmp/b77/batches.jsonl --threads 2 --rank 16 --alpha 32 --max-steps 30 --bf16 $1 --out /tmp/speed3-peft-$1-$2.json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print('peer', d['bf16'], d['tokens_per_s'], 'tok/s steady;', round(d['tokens']/d['seconds']*0+ (d['tokens']*30/28)/d['total_seconds'],1), 'tok/s whole run; peak', d['peak_rss_mib'])"; }
ours a; peer on 1; peer off 1; ours b; peer on 2
