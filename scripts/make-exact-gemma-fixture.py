#!/usr/bin/env python3
"""One-off: the exact reference along llama.cpp's teacher-forced Gemma 3 tokens
(as make-exact-fixture.py does for SmolLM2): transformers on the Gemma 3 GGUF's
weights dequantized to f32, eager attention, on the tokens of
tests/fixtures/llamacpp_gemma3_270m_q4_k_m.json; added to
tests/fixtures/exact_teacher_forced.json under that fixture's name. Needs torch,
transformers, gguf (PyPI); not run in CI.

  python3 scripts/make-exact-gemma-fixture.py gemma-3-270m-q4_k_m.gguf tests/fixtures
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM

gguf, fixtures = sys.argv[1], sys.argv[2]
name = "llamacpp_gemma3_270m_q4_k_m.json"
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                             dtype=torch.float32, attn_implementation="eager")
model.eval()
print(model.config)
fx = json.load(open(os.path.join(fixtures, name)))
chats = []
for chat in fx["chats"]:
    ids = chat["prompt_tokens"] + [s["id"] for s in chat["steps"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.double(), dim=-1)
    steps = []
    p0 = len(chat["prompt_tokens"]) - 1
    for si, s in enumerate(chat["steps"]):
        row = lp[p0 + si]
        top = torch.topk(row, 2)
        steps.append({
            "top2": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
            "llamacpp_top": [[int(i), float(row[int(i)])] for i, _ in s["top"]],
        })
    chats.append({"prompt_tokens": chat["prompt_tokens"], "steps": steps})
path = os.path.join(fixtures, "exact_teacher_forced.json")
out = json.load(open(path))
out["fixtures"][name] = chats
json.dump(out, open(path, "w"), separators=(",", ":"))
print("wrote", path)
