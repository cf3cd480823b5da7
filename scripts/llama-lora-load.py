#!/usr/bin/env python3
"""Peer measurement for BENCHMARKS.md: N concurrent /completion requests against a
llama-server that has K LoRA adapters loaded (--lora a0 ... --lora aK-1), request i
using adapter i % K (scale 1, the others 0). Prints end-to-end generated tok/s.

  python3 scripts/llama-lora-load.py http://127.0.0.1:8092 64 8 64
"""
import json, sys, threading, time, urllib.request

base, n, k, n_predict = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
done = []

def one(i):
    prompt = [(100 + i * 37 + j * 11) % 40000 + 50 for j in range(16)]  # same prompts as retune-bench engine
    lora = [{"id": a, "scale": 1.0 if (k > 0 and a == i % k) else 0.0} for a in range(k)]
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": True,
            "cache_prompt": False, "lora": lora}
    req = urllib.request.Request(base + "/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        done.append(json.loads(r.read())["tokens_predicted"])

t = time.time()
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for th in threads: th.start()
for th in threads: th.join()
el = time.time() - t
print(f"{n} requests, {k} adapters: {sum(done)} tokens in {el:.1f}s = {sum(done)/el:.1f} tok/s end-to-end")
