#!/usr/bin/env python3
"""The prefix cache's classification workload over HTTP, for comparing servers in
one run (BENCHMARKS.md, "Prefix cache"): one system prompt listing the 77 Banking77
labels, a Banking77 message per request (every 97th row of train.csv, as
`retune-bench prefix` takes them), N requests with S in flight, streamed chat
completions, greedy, 8 tokens. Prints time to first token p50/p99 and requests/s.

  python3 scripts/prefix-peer.py URL KEY MODEL [--requests 64] [--streams 32] [--llama]

`--llama` adds llama-server's `cache_prompt: true` (retune refuses unknown fields).
"""
import argparse, csv, http.client, json, threading, time, urllib.parse

ap = argparse.ArgumentParser()
ap.add_argument("url"); ap.add_argument("key"); ap.add_argument("model")
ap.add_argument("--requests", type=int, default=64)
ap.add_argument("--streams", type=int, default=32)
ap.add_argument("--data", default="../shared/data/banking77")
ap.add_argument("--llama", action="store_true")
a = ap.parse_args()
labels = json.load(open(f"{a.data}/categories.json"))
rows = list(csv.reader(open(f"{a.data}/train.csv")))[1:]
texts = [r[0] for r in rows][::97][: a.requests]
system = ("You are the ticket router of a bank's support desk. Read the customer's message and "
          "answer with exactly one label from this list, and nothing else. Labels: "
          + ", ".join(labels) + ". If several labels seem to fit, choose the one that names the "
          "customer's main problem. Never invent a label, never explain.")
u = urllib.parse.urlparse(a.url)
ttft, lock, nxt = [], threading.Lock(), [0]

def worker():
    while True:
        with lock:
            i = nxt[0]; nxt[0] += 1
        if i >= len(texts):
            return
        body = {"model": a.model, "max_tokens": 8, "temperature": 0, "stream": True,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": texts[i]}]}
        if a.llama:
            body["cache_prompt"] = True
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=900)
        t0 = time.time()
        c.request("POST", "/v1/chat/completions", json.dumps(body),
                  {"Authorization": f"Bearer {a.key}", "Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, (r.status, r.read()[:300])
        first = None
        for line in r:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.time() - t0
        with lock:
            ttft.append(first if first is not None else time.time() - t0)

start = time.time()
ts = [threading.Thread(target=worker) for _ in range(a.streams)]
[t.start() for t in ts]; [t.join() for t in ts]
wall = time.time() - start
ttft.sort()
q = lambda p: ttft[round((len(ttft) - 1) * p)]
print(json.dumps({"requests": len(ttft), "streams": a.streams, "wall_s": round(wall, 2),
                  "req_per_s": round(len(ttft) / wall, 3), "ttft_p50_s": round(q(0.5), 3),
                  "ttft_p99_s": round(q(0.99), 3)}))
