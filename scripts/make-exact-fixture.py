#!/usr/bin/env python3
"""One-off: the exact reference along llama.cpp's teacher-forced continuations.

transformers (+ peft for the adapter fixtures) on the GGUF's weights dequantized to
f32, run on the same tokens the llama.cpp fixtures hold (the prompt, then llama.cpp's
own greedy tokens): at every step, the exact top-2 and the exact logprob of each of
llama.cpp's top-5 tokens. The agreement checks use it to tell which steps are
decided by the model and which by the rounding of an implementation's arithmetic
(tests/src/lib.rs, `teacher_forced`). Needs torch, transformers, peft, gguf (PyPI);
not run in CI.

  python3 scripts/make-exact-fixture.py MODEL.gguf tests/fixtures
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel

gguf, fixtures = sys.argv[1], sys.argv[2]
base = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
base.eval()
lora = PeftModel.from_pretrained(base, os.path.join(fixtures, "lora", "adapter"))
lora.eval()
out = {"source": "transformers + peft, GGUF weights dequantized to f32, on llama.cpp's teacher-forced tokens", "fixtures": {}}
for name, adapter in [("llamacpp_smollm2_q4_1.json", False), ("lora/llamacpp_lora.json", True), ("lora/llamacpp_lora_f32kv.json", True)]:
    fx = json.load(open(os.path.join(fixtures, name)))
    chats = []
    for chat in fx["chats"]:
        ids = chat["prompt_tokens"] + [s["id"] for s in chat["steps"]]
        with torch.no_grad():
            if adapter:
                logits = lora(torch.tensor([ids])).logits[0]
            else:
                with lora.disable_adapter():
                    logits = lora(torch.tensor([ids])).logits[0]
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
    out["fixtures"][name] = chats
json.dump(out, open(os.path.join(fixtures, "exact_teacher_forced.json"), "w"), separators=(",", ":"))
print("wrote", os.path.join(fixtures, "exact_teacher_forced.json"))
