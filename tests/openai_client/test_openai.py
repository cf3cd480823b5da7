"""The official `openai` client, unmodified, against a running retune server.

Usage: python test_openai.py BASE_URL API_KEY MODEL_ID
"""
import sys
import openai

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
admin_key = sys.argv[4] if len(sys.argv) > 4 else None
client = openai.OpenAI(base_url=base + "/v1", api_key=key)

ids = [m.id for m in client.models.list().data]
assert model in ids, ids

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                      max_tokens=8, temperature=0)
assert chat.choices[0].message.role == "assistant"
assert chat.choices[0].finish_reason in ("stop", "length")
assert chat.usage.completion_tokens <= 8 and chat.usage.prompt_tokens > 0
assert chat.id.startswith("chatcmpl-")

comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
assert comp.choices[0].text and comp.usage.completion_tokens == 6

pieces, usage, finish = [], None, None
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                        max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
for ev in stream:
    if ev.usage is not None:
        usage = ev.usage
    for ch in ev.choices:
        if ch.delta.content:
            pieces.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
assert "".join(pieces) == chat.choices[0].message.content, ("".join(pieces), chat.choices[0].message.content)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens and finish == chat.choices[0].finish_reason

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
    raise AssertionError("expected AuthenticationError")
except openai.AuthenticationError:
    pass
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=10**7)
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError:
    pass
# content parts (what many SDKs send) give the same text as a string
parts = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
    {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}])
assert parts.choices[0].message.content == chat.choices[0].message.content
# the same seed gives the same sampled text; penalties and logit_bias are honoured
same = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_tokens=16, temperature=1.0, seed=1234).choices[0].message.content
        for _ in range(2)]
assert same[0] == same[1], same
pen = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
                                     temperature=0, presence_penalty=2, frequency_penalty=2, logit_bias={"42": 5})
assert pen.choices[0].message.content is not None
# what is not built is refused by name (and bad values), never silently dropped
for kwargs, param in [({"response_format": {"type": "json_schema", "json_schema": {
                          "name": "x", "schema": {"type": "frobnicate"}}}}, "response_format"),
                      ({"n": 1000}, "n"),
                      ({"logit_bias": {"42": -150}}, "logit_bias"),
                      ({"frequency_penalty": 5}, "frequency_penalty"),
                      ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
                       "tools")]:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2, **kwargs)
        raise AssertionError(f"expected BadRequestError for {param}")
    except openai.BadRequestError as e:
        assert e.param == param, (e.param, param)
# unknown fields: ignored, and named in a header
raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=2, extra_body={"mystery_knob": 1})
assert raw.headers.get("x-retune-ignored-params") == "mystery_knob", dict(raw.headers)
print("openai client: models, chat, completion, streaming, content parts, refused fields, 404/401/400 errors OK")

# ---- structured output, n, logit_bias, logprobs ----
import json
import concurrent.futures as cf
import httpx
from typing import Literal
from pydantic import BaseModel, Field


class Ticket(BaseModel):
    category: Literal["card_lost", "refund", "transfer", "other"]
    urgent: bool
    summary: str = Field(max_length=60)


TICKET = [{"role": "system", "content": "Classify the support ticket as JSON."},
          {"role": "user", "content": "My card was stolen this morning and I need a new one."}]
models = [model]
if admin_key:
    # an adapter for the same base (a committed PEFT fixture), uploaded and promoted
    fx = "tests/fixtures/lora/adapter"
    h = {"Authorization": f"Bearer {admin_key}"}
    with open(f"{fx}/adapter_config.json", "rb") as c_, open(f"{fx}/adapter_model.safetensors", "rb") as m_:
        up = httpx.post(f"{base}/admin/adapters/local/ticket-json/upload", headers=h,
                        files={"adapter_config": c_, "adapter_model": m_}, timeout=60)
    assert up.status_code == 201, up.text
    pr = httpx.post(f"{base}/admin/adapters/local/ticket-json/promote", headers=h,
                    json={"version": up.json()["id"], "expected": "none"}, timeout=60)
    assert pr.status_code == 200, pr.text
    models.append("ticket-json")
for m in models:
    # parse() with a Pydantic model: a parsed object, not streamed and streamed
    for seed in (1, 2):
        r = client.beta.chat.completions.parse(model=m, messages=TICKET, response_format=Ticket,
                                               max_tokens=120, seed=seed)
        t = r.choices[0].message.parsed
        assert isinstance(t, Ticket), r
        assert r.choices[0].finish_reason == "stop"
    with client.beta.chat.completions.stream(model=m, messages=TICKET, response_format=Ticket,
                                             max_tokens=120, seed=3) as st:
        deltas = [ev for ev in st if ev.type == "content.delta"]
        final = st.get_final_completion()
    assert deltas and isinstance(final.choices[0].message.parsed, Ticket), final
    assert (final.model == m) or final.model.startswith(m + "@"), final.model

# json_object: 100 sampled completions at temperature 1, every one parses


def one_object(seed):
    r = client.chat.completions.create(model=model, messages=[
        {"role": "system", "content": "Reply with a JSON object."},
        {"role": "user", "content": "My card was stolen yesterday. Give the category and urgency as JSON."}],
        response_format={"type": "json_object"}, temperature=1.0, max_tokens=200, seed=seed)
    text = r.choices[0].message.content
    return json.loads(text), r.choices[0].finish_reason


with cf.ThreadPoolExecutor(16) as ex:
    objs = list(ex.map(one_object, range(100)))
assert all(isinstance(o, dict) for o, _ in objs)
print(f"json_object: 100 of 100 parse ({sum(f == 'length' for _, f in objs)} closed early for length)")

# a choice constraint (vLLM's guided_choice) always returns one of the choices
labels = ["card_lost", "refund", "transfer_failed", "card arrival (late)"]
got = set()
for seed in range(12):
    r = client.chat.completions.create(model=model, messages=TICKET, temperature=1.0, seed=seed, max_tokens=16,
                                       extra_body={"guided_choice": labels})
    assert r.choices[0].message.content in labels, r.choices[0].message.content
    got.add(r.choices[0].message.content)
assert len(got) > 1, got

# n=2: two choices from one request; sample 0 is the request's seed alone
two = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                                     max_tokens=12, temperature=1.0, seed=77, n=2)
assert [c.index for c in two.choices] == [0, 1]
alone = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_tokens=12, temperature=1.0, seed=77)
assert two.choices[0].message.content == alone.choices[0].message.content
assert two.choices[0].message.content != two.choices[1].message.content
assert two.usage.prompt_tokens == alone.usage.prompt_tokens
seen = {0: [], 1: []}
for ev in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                                         max_tokens=12, temperature=1.0, seed=77, n=2, stream=True):
    for ch in ev.choices:
        seen[ch.index].append(ch.delta.content or "")
assert ["".join(seen[k]) for k in (0, 1)] == [c.message.content for c in two.choices]

# logit_bias -100 bans the token greedy decoding picks first (its id from /tokenize)
hello = [{"role": "user", "content": "Say hello."}]
g = client.chat.completions.create(model=model, messages=hello, max_tokens=1, temperature=0)
tok_text = g.choices[0].message.content
ids = httpx.post(f"{base}/tokenize", headers={"Authorization": f"Bearer {key}"},
                 json={"prompt": tok_text, "add_special_tokens": False}).json()["tokens"]
assert len(ids) == 1, (tok_text, ids)
banned = client.chat.completions.create(model=model, messages=hello, max_tokens=1, temperature=0,
                                        logit_bias={str(ids[0]): -100})
assert banned.choices[0].message.content != tok_text, (tok_text, banned.choices[0].message.content)
# logprobs: the token's own bytes; legacy completions have their own shape
lp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=1,
                                    temperature=0, logprobs=True, top_logprobs=3)
first = lp.choices[0].logprobs.content[0]
assert len(first.top_logprobs) == 3 and first.bytes == list(first.token.encode())
assert first.top_logprobs[0].token == first.token
comp_lp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1,
                                    temperature=0, logprobs=2)
assert comp_lp.choices[0].logprobs.tokens and comp_lp.choices[0].logprobs.text_offset == [0]
# top_logprobs: 0 gives none
zero = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=2,
                                      temperature=0, logprobs=True, top_logprobs=0)
assert all(e.top_logprobs == [] for e in zero.choices[0].logprobs.content)
# tools: refused by name (documented: retune does not implement tool calling)
try:
    client.chat.completions.create(model=model, messages=TICKET, max_tokens=4,
                                   tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    raise AssertionError("tools must be refused")
except openai.BadRequestError as e:
    assert e.param == "tools" and "tool calling" in str(e), e
print("openai client: parse() with Pydantic (streamed and not, base and adapter), json_object x100, guided_choice, "
      "n=2, logprobs, tools refused OK")

