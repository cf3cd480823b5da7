#!/usr/bin/env python3
"""Peer training-speed benchmark: LoRA fine-tuning with transformers + PEFT on CPU,
on exactly the micro-batches the Rust trainer is benchmarked on.

Needs the packages of /work/pyenv (torch, transformers, peft, gguf); it is a
reference tool run by hand and never runs in CI.

  /work/pyenv/bin/python scripts/peft-train-bench.py \\
      --model /root/.cache/retune/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --batches batches.jsonl [--threads 2] [--rank 16] [--alpha 32] \\
      [--modules q,k,v,o,gate,up,down] [--lr 5e-4] [--warmup 30] \\
      [--max-steps N] [--max-seconds S] [--bf16 auto|on|off] [--out result.json]

--model: a GGUF file (transformers dequantizes it to f32) or a Hugging Face model
directory (loaded in f32).
--batches: JSON lines, one micro-batch each:
  {"input_ids": [[int, ...], ...], "labels": [[int or -100, ...], ...]}
with unpadded rows of varying length. Each batch is right-padded to its longest row
(pad id 0, label -100, attention_mask 0). The loss is transformers' causal LM loss
(labels shifted inside the model; mean over the batch's non -100 positions).

Training: LoRA (dropout 0, no bias) on the given modules (short names q,k,v,o,gate,up,
down or full names such as q_proj), AdamW (weight decay 0), linear warm-up then cosine
decay (get_cosine_schedule_with_warmup), gradient clipping at 1.0, one optimizer step
per micro-batch, batches in file order, cycling if --max-steps exceeds them. Stops
after --max-steps (default: one pass over the file) or once --max-seconds of training
wall time have passed. The schedule's total is --max-steps, or the number of batches
when only --max-seconds is given (a time-limited run ends part-way along it).
--bf16 auto uses torch.autocast("cpu", bfloat16) only if /proc/cpuinfo lists amx_bf16
or avx512_bf16; on / off force it.

Timing skips the first 2 steps (warm-up). Reported: steps (timed), tokens (non-pad
input tokens of the timed steps), label_tokens, seconds, tokens_per_s, examples_per_s,
loss of the first and last step, peak RSS (MiB), versions, threads, bf16, CPU model.
Prints one JSON object and writes it to --out if given.
"""
import argparse, json, math, os, platform, resource, sys, time

import torch

WARMUP_SKIP = 2
SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
         "down": "down_proj"}


def cpu_info():
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and name is None:
                    name = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def load_model(path):
    from transformers import AutoModelForCausalLM
    if os.path.isfile(path) and path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                    gguf_file=os.path.basename(path), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def load_batches(path):
    batches = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            b = json.loads(line)
            ids, labels = b["input_ids"], b["labels"]
            if len(ids) != len(labels) or any(len(a) != len(l) for a, l in zip(ids, labels)) or not ids:
                sys.exit(f"{path}:{n}: input_ids and labels must have the same (non-empty) shape")
            T = max(len(r) for r in ids)
            t_ids = torch.zeros(len(ids), T, dtype=torch.long)
            t_mask = torch.zeros(len(ids), T, dtype=torch.long)
            t_lab = torch.full((len(ids), T), -100, dtype=torch.long)
            for i, (r, l) in enumerate(zip(ids, labels)):
                t_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                t_mask[i, :len(r)] = 1
                t_lab[i, :len(l)] = torch.tensor(l, dtype=torch.long)
            batches.append({"input_ids": t_ids, "attention_mask": t_mask, "labels": t_lab,
                            "tokens": int(t_mask.sum()), "label_tokens": int((t_lab[:, 1:] != -100).sum()),
                            "rows": len(ids)})
    if not batches:
        sys.exit(f"{path}: no batches")
    return batches


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--modules", default="q,k,v,o,gate,up,down")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--max-seconds", type=float)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--out")
    a = ap.parse_args()

    import peft, transformers
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cpu, flags = cpu_info()
    bf16 = a.bf16 == "on" or (a.bf16 == "auto" and bool(flags & {"amx_bf16", "avx512_bf16"}))

    batches = load_batches(a.batches)
    modules = [SHORT.get(m.strip(), m.strip()) for m in a.modules.split(",") if m.strip()]
    model = load_model(a.model)
    model.config.use_cache = False
    cfg = LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=modules, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    total_steps = a.max_steps if a.max_steps else len(batches)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=a.warmup, num_training_steps=total_steps)

    losses, timed_tokens, timed_label_tokens, timed_rows = [], 0, 0, 0
    start = time.perf_counter()
    t_timed = None
    step = 0
    while step < total_steps:
        if a.max_seconds is not None and time.perf_counter() - start >= a.max_seconds:
            break
        if step == WARMUP_SKIP:
            t_timed = time.perf_counter()
        b = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        loss = out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= WARMUP_SKIP:
            timed_tokens += b["tokens"]
            timed_label_tokens += b["label_tokens"]
            timed_rows += b["rows"]
        step += 1
    end = time.perf_counter()
    timed_steps = max(0, step - WARMUP_SKIP)
    secs = end - t_timed if t_timed is not None else 0.0

    res = {
        "tool": "transformers+peft",
        "model": a.model,
        "batches_file": a.batches,
        "steps_run": step,
        "steps": timed_steps,
        "warmup_steps_skipped": min(step, WARMUP_SKIP),
        "tokens": timed_tokens,
        "label_tokens": timed_label_tokens,
        "examples": timed_rows,
        "seconds": round(secs, 4),
        "tokens_per_s": round(timed_tokens / secs, 2) if secs > 0 else None,
        "examples_per_s": round(timed_rows / secs, 3) if secs > 0 else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "total_seconds": round(end - start, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "lora": {"rank": a.rank, "alpha": a.alpha, "modules": modules, "trainable_params": n_trainable},
        "optim": {"name": "AdamW", "lr": a.lr, "weight_decay": 0.0, "warmup": a.warmup,
                  "schedule": "cosine", "schedule_total_steps": total_steps, "max_grad_norm": 1.0},
        "threads": a.threads,
        "bf16": bf16,
        "attn_implementation": getattr(pm.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
    }
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
