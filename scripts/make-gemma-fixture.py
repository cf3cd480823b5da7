#!/usr/bin/env python3
"""One-off: HF transformers' (and peft's) logits for the tiny random Gemma 3 that
`retune_engine::tiny::TinySpec::gemma3()` writes, the reference the engine's
Gemma 3 block is checked against. Needs torch, transformers and peft (PyPI);
none of it runs in CI.

  RETUNE_TINY_OUT=/tmp/tiny-gemma cargo test --release -p retune-engine \\
      --test gemma3 write_tiny_gemma -- --ignored
  python3 scripts/make-gemma-fixture.py /tmp/tiny-gemma/hf tests/fixtures/gemma3

Writes into the output directory:
  adapter/           a PEFT LoRA made by peft on the tiny model (r=4, alpha=8,
                     all seven projections, B ~ N(0, 0.2), seed 0)
  hf_logits.json     for each token sequence: the last position's logits from
                     the base model, and from the base model with the adapter
                     (eager attention, f32; sequences longer than the
                     sliding window of 8 exercise it)
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

hf_dir, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
model.eval()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(1)
seqs = [
    [5, 77, 200, 31],
    torch.randint(3, vocab, (9,), generator=g).tolist(),
    torch.randint(3, vocab, (23,), generator=g).tolist(),
    torch.randint(3, vocab, (40,), generator=g).tolist(),
]


def last_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0, -1].tolist()


base = [last_logits(model, s) for s in seqs]
cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
torch.manual_seed(0)
pm = get_peft_model(model, cfg)
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.2)
pm.eval()
adapted = [last_logits(pm, s) for s in seqs]
pm.save_pretrained(os.path.join(out, "adapter"))
import transformers, peft
json.dump({"source": f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}",
           "model": "retune_engine::tiny::TinySpec::gemma3()",
           "seqs": seqs, "base": base, "adapter": adapted},
          open(os.path.join(out, "hf_logits.json"), "w"))
print("wrote", out)
