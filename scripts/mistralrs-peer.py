#!/usr/bin/env python3
"""retune beside mistral.rs 0.9.5 (PyPI wheel, CPU), one run, the same weights:
single-stream decode, prefill of a 512-token prompt, 32 concurrent streams, and
32 streams over 8 distinct r=16 adapters (per-request LoRA). retune serves the
GGUF (Q4_1) through `retune serve`; mistral.rs cannot serve a GGUF llama base
with per-request LoRA, so it gets the same weights as safetensors
(scripts/gguf-to-safetensors.py) quantized in situ to Q4_1, and runs in this
process (its Python runner; requests from threads).

usage: mistralrs-peer.py --gguf MODEL.gguf [--retune target/release/retune] [--dir WORK]
needs: mistralrs==0.9.5 gguf numpy safetensors tokenizers
"""
import argparse, hashlib, json, os, subprocess, sys, threading, time, urllib.request
import numpy as np
from safetensors.numpy import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--gguf", required=True)
ap.add_argument("--retune", default="target/release/retune")
ap.add_argument("--dir", default="/tmp/retune-mistralrs-peer")
ap.add_argument("--streams", type=int, default=32)
ap.add_argument("--adapters", type=int, default=8)
ap.add_argument("--decode-tokens", type=int, default=128)
ap.add_argument("--seconds", type=float, default=20)
a = ap.parse_args()
os.makedirs(a.dir, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))
st = os.path.join(a.dir, "safetensors")
if not os.path.exists(os.path.join(st, "model.safetensors")):
    subprocess.run([sys.executable, os.path.join(here, "gguf-to-safetensors.py"), a.gguf, st], check=True)
cfg = json.load(open(os.path.join(st, "config.json")))
H, L, F = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
hd = H // cfg["num_attention_heads"]
KV = cfg["num_key_value_heads"] * hd
shapes = {"q_proj": (H, H), "k_proj": (KV, H), "v_proj": (KV, H), "o_proj": (H, H),
          "gate_proj": (F, H), "up_proj": (F, H), "down_proj": (H, F)}
attn = {"q_proj", "k_proj", "v_proj", "o_proj"}

def write_adapter(path, seed, r=16):
    """A random r=16 PEFT adapter on all 7 modules (B nonzero: it changes outputs)."""
    rng = np.random.default_rng(seed)
    t = {}
    for l in range(L):
        for m, (o, i) in shapes.items():
            blk = "self_attn" if m in attn else "mlp"
            k = f"base_model.model.model.layers.{l}.{blk}.{m}"
            t[f"{k}.lora_A.weight"] = (rng.standard_normal((r, i)) * 0.02).astype(np.float16)
            t[f"{k}.lora_B.weight"] = (rng.standard_normal((o, r)) * 0.02).astype(np.float16)
    os.makedirs(path, exist_ok=True)
    save_file(t, os.path.join(path, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 32, "lora_dropout": 0.0, "bias": "none",
               "target_modules": list(shapes), "task_type": "CAUSAL_LM", "fan_in_fan_out": False,
               "base_model_name_or_path": st}, open(os.path.join(path, "adapter_config.json"), "w"))

names = [f"a{i}" for i in range(a.adapters)]
for i, n in enumerate(names):
    if not os.path.exists(os.path.join(a.dir, n, "adapter_config.json")):
        write_adapter(os.path.join(a.dir, n), 1000 + i)

STORY = "Write a long story about a lighthouse keeper and the sea."
LONG = " ".join(f"Ticket {i}: my card payment was declined at the shop." for i in range(45))

def pct_stats(xs):
    return sum(xs) / len(xs)

results = {}

# ---------------- retune ----------------
root = os.path.join(a.dir, "retune-root")
key = "peer-key"
if not os.path.exists(os.path.join(root, "registry.db")):
    for n in names:
        out = subprocess.run([a.retune, "adapters", "--root", root, "register", "--model", a.gguf,
                              f"bench/{n}", os.path.join(a.dir, n)], check=True, capture_output=True, text=True)
        vid = json.loads(out.stdout)["id"]
        subprocess.run([a.retune, "adapters", "--root", root, "promote", f"bench/{n}", vid,
                        "--expect", "none"], check=True, capture_output=True)
conf = os.path.join(a.dir, "retune.toml")
open(conf, "w").write(
    f'[server]\nport = 0\n[model]\npath = "{a.gguf}"\nid = "base"\n[engine]\nmax_tokens_cap = 1024\n'
    f'[adapters]\nroot = "{root}"\n[datasets]\npath = "{root}/datasets.db"\n'
    f'[[tenants]]\nname = "bench"\nkey_sha256 = ["{hashlib.sha256(key.encode()).hexdigest()}"]\n'
    f'[tenants.capture]\nenabled = false\n')
srv = subprocess.Popen([a.retune, "serve", "--config", conf], stderr=subprocess.PIPE, text=True)
port = None
for line in srv.stderr:
    if "listening on port" in line:
        port = int(line.strip().rsplit(" ", 1)[1]); break
threading.Thread(target=lambda: [None for _ in srv.stderr], daemon=True).start()

def retune_req(model, prompt, max_tokens, chat=True):
    if chat:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        path = "/v1/chat/completions"
    else:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        path = "/v1/completions"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    t = time.time()
    r = json.load(urllib.request.urlopen(req, timeout=600))
    return time.time() - t, r["usage"]

# ---------------- mistral.rs ----------------
from mistralrs import Runner, Which, ChatCompletionRequest, CompletionRequest, Architecture, LoraAdapter
mr = None
# its Python runner takes one request at a time (concurrent calls from threads
# fail with "Already borrowed"): calls are serialised
mr_lock = threading.Lock()

def mr_req(adapter, prompt, max_tokens, chat=True):
    with mr_lock:
        return mr_call(adapter, prompt, max_tokens, chat)

def mr_call(adapter, prompt, max_tokens, chat):
    t = time.time()
    if chat:
        r = mr.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0.0, ignore_eos=True, adapter=adapter))
    else:
        r = mr.send_completion_request(CompletionRequest(
            model="default", prompt=prompt, max_tokens=max_tokens, temperature=0.0, adapter=adapter))
    u = r.usage
    return time.time() - t, {"completion_tokens": u.completion_tokens, "prompt_tokens": u.prompt_tokens,
                             "completion_time": u.total_completion_time_sec, "prompt_time": u.total_prompt_time_sec}

def streams(call, adapters):
    stop, toks, errs = [False], [0], []
    lock = threading.Lock()
    def worker(k):
        i = 0
        while not stop[0]:
            ad = adapters[(k + i) % len(adapters)] if adapters else None
            i += 1
            try:
                _, u = call(ad, f"{STORY} ({k}-{i})", 32)
                with lock:
                    toks[0] += u["completion_tokens"]
            except Exception as e:
                errs.append(repr(e)); return
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(a.streams)]
    t = time.time()
    for th in ts: th.start()
    time.sleep(a.seconds)
    stop[0] = True
    for th in ts: th.join()
    el = time.time() - t
    return toks[0] / el, errs[:3]

def run(label, call, base_model):
    call(base_model, "Hello", 4)  # warm
    el, u = call(base_model, STORY, a.decode_tokens)
    # decode: generated tokens over the time after the first (prefill of a short prompt)
    el1, _ = call(base_model, STORY, 1)
    decode = (u["completion_tokens"] - 1) / max(el - el1, 1e-9)
    pre_el, pu = call(base_model, LONG, 1, chat=False)
    prefill = pu["prompt_tokens"] / pre_el
    s32, e32 = streams(call, None if base_model in (None, "base") else [base_model])
    lora32, elora = streams(call, names)
    results[label] = dict(decode=decode, decode_tokens=u["completion_tokens"], prefill=prefill,
                          prefill_tokens=pu["prompt_tokens"], streams32=s32, lora32=lora32,
                          errors=e32 + elora)
    print(json.dumps({label: results[label]}), flush=True)

run("retune", lambda ad, p, n, chat=True: retune_req(ad or "base", p, n, chat), "base")
srv.terminate(); srv.wait()
# in-situ quantization: Q4_1 is retune's format; Q8_0 and the stored f16 are
# mistral.rs's faster CPU paths (its best of the three is the peer figure)
for isq in ["Q4_1", "Q8_0", None]:
    mr = Runner(which=Which.Lora(model_id=st, arch=Architecture.Llama,
                                 adapters=[LoraAdapter(alias=n, source=os.path.join(a.dir, n)) for n in names]),
                in_situ_quant=isq, token_source="none", max_seqs=a.streams)
    run(f"mistral.rs {isq or 'f16'}", mr_req, None)
    del mr
R = results["retune"]
peers = {k: v for k, v in results.items() if k != "retune"}
for metric, what in [("decode", "single-stream decode"), ("prefill", f"prefill of {R['prefill_tokens']} tokens"),
                     ("streams32", f"{a.streams} streams, base"),
                     ("lora32", f"{a.streams} streams over {a.adapters} r=16 adapters")]:
    best = max(peers, key=lambda k: peers[k][metric])
    each = ", ".join(f"{k} {v[metric]:.1f}" for k, v in peers.items())
    print(f"{what}: retune {R[metric]:.1f} tok/s; {each}; against the best ({best}): {R[metric]/max(peers[best][metric],1e-9):.2f}x")
