#!/usr/bin/env python3
"""Sampling and structured-output speed for BENCHMARKS.md, against a running
`retune serve` (no build or other load on the machine while it runs).

Arms, each N concurrent streaming chat completions of 128 tokens, alternated for
ROUNDS rounds: greedy; sampled (temperature 1, top_p 0.9); the same sampled
request unconstrained and under a JSON schema (an array of at least 12 ticket
objects: enums, booleans, integers, bounded strings, so every token is masked
and the output runs the full 128 tokens). Aggregate decode tok/s counts tokens
after every stream had its first one, over that window (as http-bench.py).
Then time to first token, one request on an idle server: no constraint,
json_object, and a schema never seen before (compiled on arrival), 5 each.

  python3 scripts/structured-bench.py http://127.0.0.1:8080 local smollm2-135m-instruct 32 2
"""
import http.client, json, statistics, sys, threading, time, urllib.parse

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 32
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 2
u = urllib.parse.urlparse(base)
H = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
LABELS = ["card_lost", "refund", "transfer_failed", "card_arrival", "exchange_rate", "other"]


def schema(labels=LABELS):
    item = {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9999},
        "label": {"enum": labels},
        "urgent": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 24}},
        "required": ["id", "label", "urgent", "note"], "additionalProperties": False}
    return {"type": "object", "properties": {"tickets": {"type": "array", "items": item, "minItems": 12}},
            "required": ["tickets"], "additionalProperties": False}


def body(i, sampled, constraint=None, stream=True, max_tokens=128):
    b = {"model": model, "stream": stream, "max_tokens": max_tokens, "ignore_eos": True,
         "messages": [{"role": "system", "content": "List the support tickets as JSON."},
                      {"role": "user", "content": f"Ticket batch {i}: card declined, refund missing, transfer late."}]}
    b.update({"temperature": 1.0, "top_p": 0.9, "seed": i} if sampled else {"temperature": 0})
    if constraint is not None:
        b["response_format"] = constraint
    return json.dumps(b)


def arm(name, make):
    firsts, stamps, counts = [], [], []
    lock = threading.Lock()

    def one(i):
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        t0 = time.time()
        c.request("POST", "/v1/chat/completions", make(i), H)
        r = c.getresponse()
        assert r.status == 200, (r.status, r.read()[:300])
        mine, first = [], None
        for line in r:
            if line.startswith(b"data: {"):
                ev = json.loads(line[6:])
                if ev["choices"] and ev["choices"][0].get("finish_reason") is None:
                    now = time.time()
                    first = first or now - t0
                    mine.append(now)
        with lock:
            firsts.append(first)
            stamps.extend(mine)
            counts.append(len(mine))

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    end = time.time()
    w = start + max(firsts)
    rate = len([s for s in stamps if s > w]) / (end - w)
    print(f"  {name:<28} {rate:7.1f} tok/s decode, {len(stamps) / (end - start):7.1f} tok/s end to end, "
          f"tokens/stream min {min(counts)} mean {statistics.mean(counts):.0f}", flush=True)
    return rate


rf = {"type": "json_schema", "json_schema": {"name": "tickets", "schema": schema(), "strict": True}}
arms = [("greedy", lambda i: body(i, False)),
        ("sampled t=1 top_p=0.9", lambda i: body(i, True)),
        ("sampled, JSON schema", lambda i: body(i, True, rf))]
res = {a[0]: [] for a in arms}
for r in range(rounds):
    print(f"round {r + 1}, {n} streams", flush=True)
    for name, make in arms:
        res[name].append(arm(name, make))
med = {k: statistics.median(v) for k, v in res.items()}
print(f"sampled / greedy: {med['sampled t=1 top_p=0.9'] / med['greedy']:.3f}")
print(f"schema-constrained / unconstrained (both sampled): "
      f"{med['sampled, JSON schema'] / med['sampled t=1 top_p=0.9']:.3f}")


def ttft(make, reps=5):
    out = []
    for i in range(reps):
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        t0 = time.time()
        c.request("POST", "/v1/chat/completions", make(i), H)
        r = c.getresponse()
        assert r.status == 200, (r.status, r.read()[:300])
        for line in r:
            if line.startswith(b"data: {"):
                out.append((time.time() - t0) * 1e3)
                break
        r.read()
    return statistics.median(out)


print("time to first token, idle server, median of 5:")
print(f"  no constraint            {ttft(lambda i: body(i, True, max_tokens=1)):7.1f} ms")
print(f"  json_object              {ttft(lambda i: body(i, True, {'type': 'json_object'}, max_tokens=1)):7.1f} ms")
fresh = lambda i: body(i, True, {"type": "json_schema", "json_schema": {
    "name": "t", "schema": schema(LABELS + [f"label_{time.time_ns()}_{j}" for j in range(20)])}}, max_tokens=1)
print(f"  JSON schema, never seen  {ttft(fresh):7.1f} ms")
