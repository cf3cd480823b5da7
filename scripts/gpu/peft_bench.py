#!/usr/bin/env python3
"""The peer for `retune-bench device`: HF transformers + peft on the same model and
adapter files (scripts/gpu/make_model.py), same stream count and token counts.

  python3 scripts/gpu/peft_bench.py --model /tmp/l8b --streams 64 --distinct 0,1,16,100 --json out.json

For each distinct-adapter count d: the streams are split into d groups (stream i uses
adapter a{i % d}); with peft one group runs at a time (`set_adapter`, then a batched
`generate` of that group's streams), which is how peft serves several adapters
without mixed batches. Also reported: peft's mixed-batch `adapter_names=` generate
(one call for all streams) where peft supports it.
Decode tok/s = generated tokens / (time of generate(N new) - time of generate(1 new)),
i.e. prefill excluded as in retune's number; TTFT = time of generate(1 new token);
inter-token latency = (time(N) - time(1)) / (N - 1).
"""
import argparse
import json
import time

import torch


def prompts(n, length, vocab):
    # same recipe as retune-bench device
    return torch.tensor([[((i * 7919 + j * 104729) % (min(vocab, 32000) - 10) + 10)
                          for j in range(length)] for i in range(n)], dtype=torch.long)


def timed_generate(model, ids, new, **kw):
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    assert out.shape[1] == ids.shape[1] + new
    return time.perf_counter() - t


def measure(model, ids, new, **kw):
    """(ttft s, decode tok/s, inter-token s) for one batched generate."""
    t1 = timed_generate(model, ids, 1, **kw)
    tn = timed_generate(model, ids, new, **kw)
    decode = max(tn - t1, 1e-9)
    return t1, ids.shape[0] * (new - 1) / decode, decode / (new - 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--distinct", default="0,1,16,100")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM
    import peft
    dev = a.device
    dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(dev).eval()
    vocab = model.config.vocab_size
    ids = prompts(a.streams, a.prompt_tokens, vocab).to(dev)
    n = a.decode_tokens
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else dev,
           "torch": torch.__version__, "peft": peft.__version__, "streams": a.streams,
           "prompt_tokens": a.prompt_tokens, "decode_tokens": n, "latency": [], "adapters": []}
    timed_generate(model, ids[:4], 4)  # warm-up
    for s in (1, a.streams):
        ttft, tps, itl = measure(model, ids[:s], n)
        res["latency"].append({"streams": s, "ttft_ms": ttft * 1e3, "itl_ms": itl * 1e3, "tps": tps})
        print(f"base, {s} streams: TTFT {ttft * 1e3:.1f} ms, inter-token {itl * 1e3:.2f} ms, decode {tps:.1f} tok/s",
              flush=True)
    counts = [int(x) for x in a.distinct.split(",")]
    base_tps = res["latency"][-1]["tps"]
    res["adapters"].append({"distinct": 0, "tps": base_tps})
    adapters = f"{a.model}/adapters"
    pm = None
    loaded = 0
    for d in [c for c in counts if c > 0]:
        if pm is None:
            pm = peft.PeftModel.from_pretrained(model, f"{adapters}/a0", adapter_name="a0").eval()
            loaded = 1
        while loaded < d:
            pm.load_adapter(f"{adapters}/a{loaded}", adapter_name=f"a{loaded}")
            loaded += 1
        groups = [[i for i in range(a.streams) if i % d == g] for g in range(min(d, a.streams))]
        # one group at a time
        t1 = tn = 0.0
        for g, members in enumerate(groups):
            pm.set_adapter(f"a{g}")
            sub = ids[members]
            t1 += timed_generate(pm, sub, 1)
            tn += timed_generate(pm, sub, n)
        grouped = a.streams * (n - 1) / max(tn - t1, 1e-9)
        row = {"distinct": d, "tps": grouped, "mode": "one group at a time"}
        # mixed batch in one generate, where this peft has it
        try:
            names = [f"a{i % d}" for i in range(a.streams)]
            _, mixed, _ = measure(pm, ids, n, adapter_names=names)
            row["tps_mixed_batch"] = mixed
        except Exception as e:  # noqa: BLE001 - report, do not fail the run
            row["mixed_batch_error"] = str(e)[:200]
        res["adapters"].append(row)
        print(f"{d} distinct: {grouped:.1f} tok/s one group at a time; mixed batch "
              f"{row.get('tps_mixed_batch', float('nan')):.1f} tok/s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
