#!/usr/bin/env python3
"""HTTP-side load for BENCHMARKS.md: N concurrent streaming /v1/completions against
`retune serve`, 128 tokens each (ignore_eos). Prints aggregate decode tok/s (tokens
after every stream had its first token, over that window, as `retune-bench engine` counts
inside the engine) and time-to-first-token p50/p99.

  python3 scripts/http-bench.py http://127.0.0.1:8080 local smollm2-135m-instruct 32
"""
import http.client, json, sys, threading, time, urllib.parse

base, key, model, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
u = urllib.parse.urlparse(base)
firsts, stamps = [], []
lock = threading.Lock()

def one(i):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"model": model, "prompt": f"Ticket {i}: my card payment was declined twice today, please help",
                       "max_tokens": 128, "temperature": 0, "stream": True, "ignore_eos": True})
    t0 = time.time()
    c.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.status
    mine, first = [], None
    for line in r:
        if line.startswith(b"data: {"):
            now = time.time()
            if first is None:
                first = now - t0
            mine.append(now)
    with lock:
        firsts.append(first)
        stamps.extend(mine)

ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
start = time.time()
for t in ts: t.start()
for t in ts: t.join()
end = time.time()
window_start = start + max(firsts)
after = [s for s in stamps if s > window_start]
firsts.sort()
p = lambda q: firsts[min(len(firsts) - 1, int(q * (len(firsts) - 1) + 0.5))]
print(f"{n} streams: aggregate decode {len(after) / (end - window_start):.1f} tok/s, "
      f"end-to-end {len(stamps) / (end - start):.1f} tok/s, TTFT p50 {p(0.5)*1e3:.0f} ms p99 {p(0.99)*1e3:.0f} ms")
