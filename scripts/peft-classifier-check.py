#!/usr/bin/env python3
"""Check a classifier adapter written by retune-trainer (PEFT SEQ_CLS: LoRA plus
a `score` head, its labels in the weights file's metadata) against HF
transformers + peft: `AutoModelForSequenceClassification` on the GGUF's
dequantized weights, `PeftModel.from_pretrained`, the label of each of the first
N chat rows, scored on the prompt the server renders (chat template with the
generation prompt), one row at a time.

A reference tool (torch, transformers, peft, gguf), never in CI:

  python scripts/peft-classifier-check.py MODEL.gguf ADAPTER_DIR holdout.jsonl [N] [--answers OUT.jsonl]

Prints the accuracy over the N rows; with --answers, each row's label and its
probability, to compare with `retune-trainer eval --answers` on the same rows.
"""
import json, os, sys
import torch
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel

args = [a for a in sys.argv[1:] if not a.startswith("--")]
answers_out = None
if "--answers" in sys.argv:
    answers_out = sys.argv[sys.argv.index("--answers") + 1]
    args = [a for a in args if a != answers_out]
gguf, adapter, data = args[0], args[1], args[2]
n = int(args[3]) if len(args) > 3 else 200
torch.set_num_threads(2)
with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
    labels = json.loads(f.metadata()["retune.labels"])
d, fname = os.path.dirname(gguf), os.path.basename(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=fname)
model = AutoModelForSequenceClassification.from_pretrained(
    d, gguf_file=fname, dtype=torch.float32, num_labels=len(labels)
)
# one row at a time, no padding: the last token is the one scored
model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
model = PeftModel.from_pretrained(model, adapter)
model.eval()
rows = [json.loads(l) for l in open(data)][:n]
correct = 0
out = open(answers_out, "w") if answers_out else None
for r in rows:
    msgs = r["messages"][:-1]
    want = r["messages"][-1]["content"].strip()
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    p = torch.softmax(logits.double(), -1)
    k = int(torch.argmax(logits))
    got = labels[k]
    correct += got == want
    if out:
        out.write(json.dumps({"answer": got, "p": float(p[k])}) + "\n")
print(json.dumps({"accuracy": correct / len(rows), "correct": correct, "total": len(rows)}))
