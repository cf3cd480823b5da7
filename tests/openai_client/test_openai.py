"""The official `openai` client, unmodified, against a running retune server.

Usage: python test_openai.py BASE_URL API_KEY MODEL_ID
"""
import sys
import openai

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
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
for kwargs, param in [({"response_format": {"type": "json_object"}}, "response_format"),
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
