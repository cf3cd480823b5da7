#!/usr/bin/env python3
"""One-off: a real PEFT-made LoRA adapter for SmolLM2-135M-Instruct and the
references it is checked against. Needs torch, transformers, peft, gguf (PyPI) and
a llama.cpp build (from the llama-cpp-python sdist); none of it runs in CI.

  python3 scripts/make-lora-fixture.py MODEL.gguf LLAMA_CPP_DIR tests/fixtures/lora

Writes into the output directory:
  adapter/                      PEFT adapter (r=8, alpha=16, q/k/v/o, B ~ N(0, 0.05))
  hf_peft_first_step.json       top-5 logprobs of the first generated token for each
                                fixture chat, from transformers+peft on the GGUF's
                                dequantized weights (f32)
and prints how to produce llamacpp_lora.json with make-fixtures.py against
llama-server serving the adapter converted by convert_lora_to_gguf.py.
"""
import json, os, subprocess, sys, tempfile
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

gguf, llama_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
work = tempfile.mkdtemp(prefix="retune-lora-fixture-")
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
# the base convert_lora_to_gguf.py needs (transformers will not save_pretrained a GGUF-loaded model)
from safetensors.torch import save_file
hf_dir = os.path.join(work, "hf")
os.makedirs(hf_dir, exist_ok=True)
state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
save_file(state, os.path.join(hf_dir, "model.safetensors"), metadata={"format": "pt"})
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.config.architectures = ["LlamaForCausalLM"]
model.config.save_pretrained(hf_dir)
cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
torch.manual_seed(0)
pm = get_peft_model(model, cfg)
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.05)
pm.save_pretrained(os.path.join(out, "adapter"), safe_serialization=True)

fx = json.load(open(os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "llamacpp_smollm2_q4_1.json")))
pm.eval()
ref = []
with torch.no_grad():
    for chat in fx["chats"]:
        ids = torch.tensor([chat["prompt_tokens"]])
        lp = torch.log_softmax(pm(ids).logits[0, -1].double(), dim=-1)
        top = torch.topk(lp, 5)
        ref.append({"prompt_tokens": chat["prompt_tokens"], "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)]})
json.dump({"source": "transformers + peft, GGUF weights dequantized to f32", "chats": ref},
          open(os.path.join(out, "hf_peft_first_step.json"), "w"), indent=1)

lora_gguf = os.path.join(work, "lora.gguf")
subprocess.check_call([sys.executable, os.path.join(llama_dir, "convert_lora_to_gguf.py"), "--base", os.path.join(work, "hf"),
                       "--outtype", "f32", "--outfile", lora_gguf, os.path.join(out, "adapter")])
print(f"""now (default llama.cpp settings, then its f32 KV cache without flash attention):
  {llama_dir}/build/bin/llama-server -m {gguf} --lora {lora_gguf} --port 8091 -t 2 -c 4096 -np 1 &
  python3 scripts/make-fixtures.py http://127.0.0.1:8091 {out}/llamacpp_lora.json <model sha256> 1.0
  {llama_dir}/build/bin/llama-server -m {gguf} --lora {lora_gguf} --port 8092 -t 2 -c 4096 -np 1 -ctk f32 -ctv f32 -fa off &
  python3 scripts/make-fixtures.py http://127.0.0.1:8092 {out}/llamacpp_lora_f32kv.json <model sha256> 1.0""")
