#!/usr/bin/env python3
"""Write a random-weight llama model (bf16 safetensors, HF layout) and N random
PEFT LoRA adapters for it, for throughput benchmarks. Both retune
(`retune-bench device`) and transformers+peft (`peft_bench.py`) read these files.

  python3 scripts/gpu/make_model.py --out /tmp/l8b --shape llama3-8b --adapters 100
  python3 scripts/gpu/make_model.py --out /tmp/tiny --shape tiny --adapters 4 --device cpu

Shapes: llama3-8b = Llama-3-8B (32 layers, hidden 4096, ffn 14336, 32 heads, 8 kv
heads, vocab 128256); tiny = a 2-layer model for checking the scripts on a CPU.
Adapters: a0..a{N-1}, rank --rank on all 7 projections, alpha = 2*rank, A ~ U(-1/sqrt(in),
1/sqrt(in)) like PEFT's init, B ~ N(0, 0.01) (PEFT initialises B to zero, which
would make every adapter a no-op).
"""
import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 rope_theta=10000.0, max_position_embeddings=2048),
}
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dims(c):
    h, f = c["hidden_size"], c["intermediate_size"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    # (out, in) per module, HF order
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def tokenizer(out, vocab):
    """A byte-level BPE tokenizer (256 byte tokens, no merges) + two specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    v = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    for s in specials:
        v[s] = len(v)
    assert len(v) <= vocab
    tok = Tokenizer(models.BPE(vocab=v, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": specials[0], "eos_token": specials[1], "add_bos_token": False}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    c = SHAPES[a.shape]
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    t0 = time.time()
    cfg = dict(c, architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
               hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16",
               bos_token_id=c["vocab_size"] - 2, eos_token_id=c["vocab_size"] - 1,
               attention_bias=False, mlp_bias=False)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tokenizer(a.out, c["vocab_size"])

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=a.device, dtype=torch.float32) * std) \
            .to(torch.bfloat16).cpu()

    h, v, d = c["hidden_size"], c["vocab_size"], dims(c)
    # one shard per 4 layers keeps host memory low
    n_shard, tensors, weight_map = 0, {}, {}

    def flush():
        nonlocal tensors, n_shard
        if tensors:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(tensors, os.path.join(a.out, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            n_shard += 1
            tensors = {}

    tensors["model.embed_tokens.weight"] = rnd(v, h)
    tensors["lm_head.weight"] = rnd(v, h)
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    flush()
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        for m, (o, i) in d.items():
            part = "self_attn" if m in MODULES[:4] else "mlp"
            tensors[f"{p}{part}.{m}.weight"] = rnd(o, i)
        if layer % 4 == 3:
            flush()
    flush()
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    print(f"model {a.shape} -> {a.out} in {time.time() - t0:.1f}s", flush=True)

    r = a.rank
    for n in range(a.adapters):
        ad = os.path.join(a.out, "adapters", f"a{n}")
        os.makedirs(ad, exist_ok=True)
        t = {}
        for layer in range(c["num_hidden_layers"]):
            for m, (o, i) in d.items():
                part = "self_attn" if m in MODULES[:4] else "mlp"
                base = f"base_model.model.model.layers.{layer}.{part}.{m}"
                bound = 1.0 / i ** 0.5
                t[base + ".lora_A.weight"] = ((torch.rand(r, i, generator=g, device=a.device) * 2 - 1)
                                              * bound).to(torch.bfloat16).cpu()
                t[base + ".lora_B.weight"] = rnd(o, r, std=0.01)
        save_file(t, os.path.join(ad, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(ad, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                       "target_modules": MODULES, "lora_dropout": 0.0, "bias": "none",
                       "use_rslora": False, "base_model_name_or_path": a.out}, f)
    print(f"{a.adapters} adapters (r={r}, 7 modules) in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
