#!/usr/bin/env python3
"""Check that HF peft loads an adapter written by retune-trainer and answers as
retune serves it: greedy answers on the first N held-out chat rows, with the
adapter loaded by `PeftModel.from_pretrained` on the GGUF's dequantized weights.

Needs /work/pyenv (torch, transformers, peft, gguf); a reference tool, never in CI.

  /work/pyenv/bin/python scripts/peft-load-check.py MODEL.gguf ADAPTER_DIR holdout.jsonl [N]

Prints the exact-match accuracy over the N rows and each answer, to compare with
`retune-trainer eval --limit N` on the same rows.
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

gguf, adapter, data = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 50
torch.set_num_threads(2)
d, f = os.path.dirname(gguf), os.path.basename(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter)
model.eval()
rows = [json.loads(l) for l in open(data)][:n]
correct = 0
for r in rows:
    msgs = r["messages"][:-1]
    want = r["messages"][-1]["content"].strip()
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    got = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    correct += got == want
    print(json.dumps({"want": want, "got": got}))
print(json.dumps({"accuracy": correct / len(rows), "correct": correct, "total": len(rows)}))
