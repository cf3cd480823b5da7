#!/usr/bin/env python3
"""Reference fixture for the Rust LoRA trainer: one PEFT forward/backward and one
AdamW step on a small llama, recorded so the trainer can be checked against it.

Needs the packages of /work/pyenv (torch, transformers, peft, safetensors); it is a
one-off reference tool and never runs in CI. CPU only, float32, deterministic.

  /work/pyenv/bin/python scripts/make-trainer-fixture.py BASE_DIR OUT_DIR [--max-grad-norm 1.0]
  /work/pyenv/bin/python scripts/make-trainer-fixture.py --tiny-base DIR   # write a test base

BASE_DIR is a Hugging Face directory of a family the engine serves (config.json +
model.safetensors, f32, tie_word_embeddings true); tokenizer files there are ignored.
For Gemma 3, tests/fixtures/trainer_gemma3 is made on the tiny Gemma 3 that
`TinySpec::gemma3()` writes (see scripts/make-gemma-fixture.py for how to write it). Sizes (vocab_size, ...)
are read from its config.json. --tiny-base writes such a directory: hidden 64,
intermediate 128, 2 layers, 4 heads / 2 KV heads, vocab 300, N(0, 0.1) weights,
norm weights 1 + N(0, 0.1) (seed 0).

Writes into OUT_DIR:
  adapter_init/      PEFT adapter before the step (PEFT's kaiming-uniform lora_A,
                     lora_B ~ N(0, 0.1) so that A gets gradient too)
  adapter_step1/     the same adapter after one clipped AdamW step
  first_step.json    batch, loss, per-parameter gradient L2 norms, full gradients of
                     layers.0 q_proj and layers.1 down_proj (lora_A, lora_B), the
                     pre-clip total gradient norm, AdamW settings, loss after the step

Batch: 3 sequences of 9, 14 and 6 random token ids in [3, vocab), right-padded with
id 0 (attention_mask 0 there). labels = input_ids with the first len//2 positions of
each sequence and every pad position set to -100. The loss is transformers' standard
causal LM loss: logits at t predict labels[t+1]; mean over all non -100 shifted label
positions of the whole batch.

LoRA: r=4, alpha=8 (scale 2), q,k,v,o,gate,up,down, dropout 0, no bias.
Step: clip_grad_norm_(lora params, 1.0), then AdamW(lr=1e-2, betas=(0.9, 0.999),
eps=1e-8, weight_decay=0.01) — torch's AdamW: decoupled decay p -= lr*wd*p, then the
bias-corrected Adam update.
"""
import json, os, sys

import torch

SEQ_LENS = [9, 14, 6]
R, ALPHA = 4, 8
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAMW = {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "max_grad_norm": 1.0}
FULL_GRADS = ["layers.0.self_attn.q_proj.lora_A.weight", "layers.0.self_attn.q_proj.lora_B.weight",
              "layers.1.mlp.down_proj.lora_A.weight", "layers.1.mlp.down_proj.lora_B.weight"]


def make_tiny_base(path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g) * 0.1
            # norm weights near 1 (as in trained models), the rest N(0, 0.1)
            p.copy_(1.0 + noise if "norm" in _ else noise)
    model.save_pretrained(path, safe_serialization=True)
    print(f"wrote tiny llama base to {path}")


def short(name):
    prefix = "base_model.model.model."
    assert name.startswith(prefix), name
    return name[len(prefix):].replace(".default", "")


def main(base_dir, out_dir, max_grad_norm=1.0):
    import peft, transformers
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    ADAMW["max_grad_norm"] = max_grad_norm
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    os.makedirs(out_dir, exist_ok=True)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()  # no dropout anywhere (attention_dropout is 0 anyway)
    vocab = model.config.vocab_size

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=MODULES, lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    torch.manual_seed(0)
    pm = get_peft_model(model, cfg)  # lora_A: PEFT's kaiming-uniform init (from the seed above)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(os.path.join(out_dir, "adapter_init"), safe_serialization=True)
    params = [(short(n), p) for n, p in pm.named_parameters() if p.requires_grad]
    assert params and all(".lora_" in n for n, _ in params), [n for n, _ in params]

    # batch
    g = torch.Generator().manual_seed(2)
    T = max(SEQ_LENS)
    input_ids = torch.zeros(len(SEQ_LENS), T, dtype=torch.long)
    attention_mask = torch.zeros(len(SEQ_LENS), T, dtype=torch.long)
    labels = torch.full((len(SEQ_LENS), T), -100, dtype=torch.long)
    for i, n in enumerate(SEQ_LENS):
        ids = torch.randint(3, vocab, (n,), generator=g)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, n // 2:n] = ids[n // 2:]

    # forward + backward
    out = pm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    loss = out.loss
    loss.backward()
    grad_norms = {n: float(p.grad.double().norm()) for n, p in params}
    grads = {n: p.grad.tolist() for n, p in params if n in FULL_GRADS}
    assert set(grads) == set(FULL_GRADS), sorted(grads)

    # one clipped AdamW step
    plist = [p for _, p in params]
    total = torch.nn.utils.clip_grad_norm_(plist, max_norm=ADAMW["max_grad_norm"])
    opt = torch.optim.AdamW(plist, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        loss_after = pm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    pm.save_pretrained(os.path.join(out_dir, "adapter_step1"), safe_serialization=True)

    n_loss = int((labels[:, 1:] != -100).sum())
    doc = {
        "source": f"scripts/make-trainer-fixture.py: transformers {transformers.__version__} peft {peft.__version__} "
                  f"torch {torch.__version__}, float32, eager attention, CPU",
        "base": {k: getattr(model.config, k) for k in ["vocab_size", "hidden_size", "intermediate_size",
                                                      "num_hidden_layers", "num_attention_heads",
                                                      "num_key_value_heads", "rms_norm_eps", "rope_theta",
                                                      "tie_word_embeddings"] if hasattr(model.config, k)},
        "lora": {"r": R, "alpha": ALPHA, "modules": MODULES, "dropout": 0.0,
                 "init": "lora_A: PEFT kaiming-uniform; lora_B: N(0, 0.1)"},
        "batch": {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(),
                  "labels": labels.tolist(), "seq_lens": SEQ_LENS, "pad_id": 0,
                  "loss_tokens": n_loss,
                  "loss": "mean over b,t with labels[b,t+1] != -100 of -log softmax(logits[b,t])[labels[b,t+1]]"},
        "loss": loss.item(),
        "grad_norms": grad_norms,
        "grads": grads,
        "total_grad_norm": float(total),
        "adamw": ADAMW,
        "loss_after_step": float(loss_after),
    }
    base = doc["base"]
    if "rope_theta" not in base:  # transformers 5 keeps it in rope_parameters
        rp = getattr(model.config, "rope_parameters", None) or {}
        if "rope_theta" in rp:
            base["rope_theta"] = rp["rope_theta"]
    with open(os.path.join(out_dir, "first_step.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    print(f"base {base_dir}: vocab {vocab}, {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}")
    print(f"lora params {len(params)}, loss tokens {n_loss}")
    print(f"loss {loss.item():.6f}  total grad norm (pre-clip) {float(total):.6f}  loss after step {float(loss_after):.6f}")
    for n in FULL_GRADS:
        print(f"  |grad {n}| = {grad_norms[n]:.6f}")
    if float(total) <= max_grad_norm:
        print(f"note: total grad norm {float(total):.4g} <= max_grad_norm {max_grad_norm}: clipping did not engage")
    print(f"wrote {out_dir}/first_step.json, adapter_init/, adapter_step1/")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--tiny-base":
        make_tiny_base(sys.argv[2])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[3] == "--max-grad-norm":
        main(sys.argv[1], sys.argv[2], float(sys.argv[4]))
    else:
        sys.exit(__doc__)
