#!/usr/bin/env python3
"""Serving's inter-token latency under load, for BENCHMARKS.md: C concurrent
streaming chat completions (64 tokens each, ignore_eos), re-sent for SECONDS; prints
p50/p99 of the gaps between consecutive streamed tokens and the decode tokens/s.

  python3 scripts/itl-bench.py http://127.0.0.1:8080 KEY MODEL [C=4] [SECONDS=60]
"""
import http.client, json, sys, threading, time, urllib.parse

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
c = int(sys.argv[4]) if len(sys.argv) > 4 else 4
seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 60
u = urllib.parse.urlparse(base)
gaps, tokens = [], [0]
lock = threading.Lock()
stop = time.time() + seconds

def worker(i):
    n = 0
    while time.time() < stop:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"Ticket {i}-{n}: my card payment was declined twice today, please help"}],
                           "max_tokens": 64, "temperature": 0, "stream": True, "ignore_eos": True})
        conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.status
        last, mine = None, []
        for line in r:
            if line.startswith(b"data: {"):
                now = time.time()
                if last is not None:
                    mine.append(now - last)
                last = now
        with lock:
            gaps.extend(mine)
            tokens[0] += len(mine) + 1
        n += 1

t0 = time.time()
ts = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
for t in ts: t.start()
for t in ts: t.join()
wall = time.time() - t0
gaps.sort()
q = lambda p: 1e3 * gaps[min(len(gaps) - 1, int(p * len(gaps)))]
print(json.dumps({"streams": c, "seconds": round(wall, 1), "tokens": tokens[0], "tokens_per_s": round(tokens[0] / wall, 1),
                  "itl_p50_ms": round(q(0.50), 2), "itl_p99_ms": round(q(0.99), 2), "itl_max_ms": round(1e3 * gaps[-1], 2)}))
