#!/usr/bin/env python3
"""The Banking77 loop through retune's HTTP API (stdlib only; run by
scripts/demo-banking77.sh, which starts the server and the trainer daemon).

  demo_banking77.py feed BASE_URL SPLIT_DIR --api-key K --admin-key A [--corrected 500]
      Sends SPLIT_DIR/train.jsonl for tenant `bank`, task `banking77`: --corrected rows as real chat
      completions of `banking77` (served by the base model with the task's prompt
      until a version is live), each corrected through /v1/feedback with its label;
      then the rest through the admin import route (1,000 rows a request).
  demo_banking77.py wait BASE_URL --admin-key A [--timeout-min 90]
      Waits until the trainer's run for bank/banking77 ends; prints it.
  demo_banking77.py holdout BASE_URL SPLIT_DIR --api-key K [--model banking77]
      Accuracy of the served model on SPLIT_DIR/holdout.jsonl (1,000 rows the loop
      never saw), through /v1/chat/completions, greedy.
"""
import argparse, json, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

TENANT, TASK = "bank", "banking77"


def call(base, method, path, key, body=None, raw=None, timeout=600):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def user_and_label(ex):
    msgs = ex["messages"]
    return [m for m in msgs if m["role"] != "assistant"], ex["label"]


def feed(a):
    train = rows(f"{a.split}/train.jsonl")
    corrected, imported = train[: a.corrected], train[a.corrected :]
    def one(ex):
        msgs, label = user_and_label(ex)
        st, c = call(a.base, "POST", "/v1/chat/completions", a.api_key,
                     {"model": TASK, "messages": msgs, "max_tokens": 32, "temperature": 0})
        if st != 200:
            raise RuntimeError(f"completion: {st} {c}")
        answer = c["choices"][0]["message"]["content"].strip()
        st, fb = call(a.base, "POST", "/v1/feedback", a.api_key,
                      {"completion_id": c["id"], "correction": label, "labels": {"label": label},
                       "rating": 1 if answer == label else -1})
        if st != 200:
            raise RuntimeError(f"feedback: {st} {fb}")
        return answer == label

    t = time.time()
    with ThreadPoolExecutor(4) as pool:
        right = sum(pool.map(one, corrected))
    print(f"{len(corrected)} completions served by base+prompt ({right} right, "
          f"{100 * right / max(1, len(corrected)):.1f} %), each corrected through /v1/feedback, "
          f"in {time.time() - t:.0f} s", flush=True)
    t = time.time()
    n = 0
    for i in range(0, len(imported), 1000):  # the server's body limit is 1 MiB
        lines = "".join(json.dumps(r) + "\n" for r in imported[i : i + 1000]).encode()
        st, out = call(a.base, "POST", f"/admin/data/{TENANT}/{TASK}/import", a.admin_key, raw=lines)
        if st != 200 or out.get("errors"):
            sys.exit(f"import failed: {st} {out}")
        n += out["imported"]
    print(f"imported {n} examples in {time.time() - t:.1f} s", flush=True)


def wait(a):
    deadline = time.time() + a.timeout_min * 60
    seen = None
    while time.time() < deadline:
        st, out = call(a.base, "GET", f"/admin/adapters/{TENANT}/{TASK}/runs", a.admin_key)
        runs = out.get("data", []) if st == 200 else []
        if runs:
            r = runs[0]
            if r["status"] != seen:
                seen = r["status"]
                print(f"run {r['id']}: {r['status']}", flush=True)
            if r["status"] not in ("running", "crashed"):
                print(json.dumps({k: r[k] for k in ("id", "status", "version", "snapshot")}))
                print(r["detail"].get("reason", ""))
                tr = r["detail"].get("training") or {}
                if tr:
                    print(f"training: {tr.get('steps')} steps, {tr.get('wall_seconds', 0) / 60:.1f} min, "
                          f"{tr.get('tokens_per_second', 0):.0f} tokens/s "
                          f"(steady {tr.get('steady_tokens_per_second') or 0:.0f}), "
                          f"{tr.get('examples')} examples, peak {tr.get('peak_rss_mib', 0):.0f} MiB")
                g = r["detail"].get("gate") or {}
                for arm in g.get("arms", []):
                    lo, hi = arm["interval"]
                    print(f"gate arm {arm['name']}: {100 * arm['score']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] "
                          f"on {arm['n']} eval rows ({arm['seconds']:.0f} s)")
                if g:
                    f = g["forgetting"]
                    print(f"forgetting: KL {f['kl']:.3f} nats/token (bound {f['bound']}), gate {g['seconds']:.0f} s")
                return 0 if r["status"] in ("promoted", "canary") else 1
        time.sleep(10)
    sys.exit("timed out waiting for the trainer")


def holdout(a):
    data = rows(f"{a.split}/holdout.jsonl")

    def one(ex):
        msgs, label = user_and_label(ex)
        st, c = call(a.base, "POST", "/v1/chat/completions", a.api_key,
                     {"model": a.model, "messages": msgs, "max_tokens": 32, "temperature": 0})
        if st != 200:
            raise RuntimeError(f"completion: {st} {c}")
        return c["choices"][0]["message"]["content"].strip() == label, c.get("model")

    t = time.time()
    with ThreadPoolExecutor(8) as pool:
        res = list(pool.map(one, data))
    right = sum(r for r, _ in res)
    served = sorted({m for _, m in res})
    print(f"holdout: {right}/{len(data)} = {100 * right / len(data):.1f} % served by {served} "
          f"({time.time() - t:.0f} s)")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("feed"); f.add_argument("base"); f.add_argument("split")
    f.add_argument("--api-key", required=True); f.add_argument("--admin-key", required=True)
    f.add_argument("--corrected", type=int, default=500)
    w = sub.add_parser("wait"); w.add_argument("base"); w.add_argument("--admin-key", required=True)
    w.add_argument("--timeout-min", type=float, default=90)
    h = sub.add_parser("holdout"); h.add_argument("base"); h.add_argument("split")
    h.add_argument("--api-key", required=True); h.add_argument("--model", default=TASK)
    a = p.parse_args()
    sys.exit({"feed": feed, "wait": wait, "holdout": holdout}[a.cmd](a) or 0)


if __name__ == "__main__":
    main()
