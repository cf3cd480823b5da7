#!/usr/bin/env python3
"""Write a llama GGUF (the served SmolLM2 Q4_1) as a HF safetensors directory:
dequantized weights (f16), Q/K rows back in HF order (the GGUF converter
permutes them for its rope), config.json, tokenizer.json (byte-level BPE from the
GGUF's vocabulary and merges, digits split as SmolLM2's tokenizer does) and
tokenizer_config.json with the chat template. For peers that refuse GGUF llama
bases (mistral.rs's per-request LoRA); the same weights as retune serves.

usage: gguf-to-safetensors.py MODEL.gguf OUT_DIR   (needs: gguf numpy safetensors tokenizers)
"""
import json, os, sys
import numpy as np
import gguf
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders

src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
r = gguf.GGUFReader(src)
f = lambda k: r.fields[k].contents()
n_head, n_kv = f("llama.attention.head_count"), f("llama.attention.head_count_kv")
hidden = f("llama.embedding_length")

def unpermute(w, heads):
    # inverse of llama.cpp convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

names = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
per_layer = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
tensors = {}
for t in r.tensors:
    w = dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(d) for d in reversed(t.shape)])
    if t.name in names:
        name = names[t.name]
    else:
        _, layer, kind, _ = t.name.split(".")
        name = f"model.layers.{layer}.{per_layer[kind]}.weight"
        if kind == "attn_q":
            w = unpermute(w, n_head)
        elif kind == "attn_k":
            w = unpermute(w, n_kv)
    tensors[name] = np.ascontiguousarray(w.astype(np.float16))
tied = "lm_head.weight" not in tensors
save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

tokens = f("tokenizer.ggml.tokens")
types = f("tokenizer.ggml.token_type")
merges = [tuple(m.split(" ", 1)) for m in f("tokenizer.ggml.merges")]
bos, eos = f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id")
tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
])
tok.decoder = decoders.ByteLevel()
# control tokens (type 3) are special: never split, skipped when decoding
tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                        for t, ty in zip(tokens, types) if ty == 3])
tok.save(os.path.join(out, "tokenizer.json"))

json.dump({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": hidden, "intermediate_size": f("llama.feed_forward_length"),
    "num_hidden_layers": f("llama.block_count"), "num_attention_heads": n_head,
    "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
    "rms_norm_eps": float(f("llama.attention.layer_norm_rms_epsilon")),
    "rope_theta": float(f("llama.rope.freq_base")), "rope_scaling": None,
    "max_position_embeddings": f("llama.context_length"), "vocab_size": len(tokens),
    "tie_word_embeddings": tied, "bos_token_id": bos, "eos_token_id": eos,
    "hidden_act": "silu", "torch_dtype": "float16", "attention_bias": False, "mlp_bias": False,
}, open(os.path.join(out, "config.json"), "w"), indent=1)
json.dump({
    "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[f("tokenizer.ggml.padding_token_id")],
    "unk_token": tokens[f("tokenizer.ggml.unknown_token_id")], "add_bos_token": False,
    "chat_template": f("tokenizer.chat_template"), "model_max_length": f("llama.context_length"),
}, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=1)
json.dump({"bos_token_id": bos, "eos_token_id": eos}, open(os.path.join(out, "generation_config.json"), "w"))
print(out)
