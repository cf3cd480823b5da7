#!/usr/bin/env python3
"""The PEFT peer of retune's classifier training: HF transformers + peft,
`AutoModelForSequenceClassification` on the GGUF's dequantized f32 weights, LoRA
(r, alpha) on all 7 projections of the top K layers plus the `score` head
(PEFT SEQ_CLS), AdamW with a linear warm-up and a cosine decay over the planned
steps, batches of B rows padded to their longest, the prompt the server renders
(chat template with the generation prompt). Trains for at most M minutes and
scores the held-out rows with the adapter as it was after each mark.

A reference tool (torch, transformers, peft, gguf), never in CI:

  python scripts/peft-classifier-train.py MODEL.gguf SPLIT_DIR --minutes 5,10,20,25 \
      [--top-layers 8] [--rank 16] [--alpha 32] [--lr 1e-3] [--batch 16] [--epochs 3] [--bf16]

SPLIT_DIR holds train.jsonl, holdout.jsonl and labels.json (scripts/banking77.py split).
Prints one JSON line per mark: minutes, steps, epochs, examples/s, holdout accuracy.
"""
import argparse, json, math, os, random, time
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import LoraConfig, get_peft_model

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("split")
ap.add_argument("--minutes", default="5,10,20,25")
ap.add_argument("--top-layers", type=int, default=8)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--alpha", type=float, default=32.0)
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--epochs", type=float, default=3.0)
ap.add_argument("--warmup", type=int, default=30)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--bf16", action="store_true")
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
random.seed(a.seed)
labels = json.load(open(os.path.join(a.split, "labels.json")))
index = {l: i for i, l in enumerate(labels)}
d, f = os.path.dirname(a.model), os.path.basename(a.model)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForSequenceClassification.from_pretrained(
    d, gguf_file=f, dtype=torch.float32, num_labels=len(labels)
)
pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
model.config.pad_token_id = pad
n_layers = model.config.num_hidden_layers
cfg = LoraConfig(
    task_type="SEQ_CLS",
    r=a.rank,
    lora_alpha=a.alpha,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    layers_to_transform=list(range(n_layers - a.top_layers, n_layers)),
)
model = get_peft_model(model, cfg)


def encode(path):
    out = []
    for line in open(path):
        r = json.loads(line)
        msgs = r["messages"][:-1]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        out.append((ids, index[r["messages"][-1]["content"].strip()]))
    return out


train = encode(os.path.join(a.split, "train.jsonl"))
hold = encode(os.path.join(a.split, "holdout.jsonl"))


def batches(rows, size, shuffle):
    order = list(range(len(rows)))
    if shuffle:
        random.shuffle(order)
    for i in range(0, len(order), size):
        chunk = [rows[j] for j in order[i : i + size]]
        n = max(len(c[0]) for c in chunk)
        # left padding: the last position is every row's last token
        ids = torch.tensor([[pad] * (n - len(c[0])) + c[0] for c in chunk])
        mask = torch.tensor([[0] * (n - len(c[0])) + [1] * len(c[0]) for c in chunk])
        yield ids, mask, torch.tensor([c[1] for c in chunk])


def accuracy():
    model.eval()
    right = 0
    with torch.no_grad():
        for ids, mask, y in batches(hold, 32, False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                logits = model(input_ids=ids, attention_mask=mask).logits
            right += int((logits.argmax(-1) == y).sum())
    model.train()
    return right / len(hold)


params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
steps_per_epoch = math.ceil(len(train) / a.batch)
total = int(math.ceil(a.epochs * steps_per_epoch))
sched = torch.optim.lr_scheduler.LambdaLR(
    opt,
    lambda s: s / a.warmup
    if s < a.warmup
    else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - a.warmup) / max(1, total - a.warmup)))),
)
marks = [float(m) for m in a.minutes.split(",")]
trained, step, seconds = 0, 0, 0.0
model.train()
epoch = 0
while marks and step < total:
    for ids, mask, y in batches(train, a.batch, True):
        t0 = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        seconds += time.time() - t0
        step += 1
        trained += len(y)
        while marks and seconds >= marks[0] * 60:
            print(json.dumps({"minutes": marks[0], "steps": step, "epochs": round(step / steps_per_epoch, 3),
                              "examples_per_s": round(trained / seconds, 2), "loss": float(loss),
                              "holdout_accuracy": accuracy()}), flush=True)
            marks.pop(0)
        if not marks or step >= total:
            break
    epoch += 1
if marks:
    print(json.dumps({"minutes": round(seconds / 60, 2), "steps": step, "epochs": round(step / steps_per_epoch, 3),
                      "examples_per_s": round(trained / seconds, 2), "holdout_accuracy": accuracy(), "schedule": "completed"}), flush=True)
