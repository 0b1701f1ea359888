"""The `openai` client library against `serve` on loopback: completions, chat, streaming, stop,
logprobs, usage and errors, as a user of the OpenAI SDK would call them."""

from __future__ import annotations

import pytest

from tests.serve.helpers import TIMEOUT

openai = pytest.importorskip("openai", reason="the openai client library is not installed")

CHAT = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w7 w8"}]


@pytest.fixture(scope="module")
def client(text_server):
    with openai.OpenAI(base_url=f"{text_server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT) as c:
        yield c


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completions(client, text_server):
    kw = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt="w6 w17 w13", **kw)
    want = text_server.engine.generate("w6 w17 w13", 6, ignore_eos=True)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 6
    assert client.completions.create(prompt=[6, 17, 13], **kw).choices[0].text == want.text
    chunks = list(client.completions.create(prompt="w6 w17 w13", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == want.text and chunks[-1].choices[0].finish_reason == "length"
    stop = want.text.split(" ")[2]
    s = client.completions.create(prompt="w6 w17 w13", stop=[stop], **kw)
    assert s.choices[0].text == want.text[: want.text.find(stop)] and s.choices[0].finish_reason == "stop"
    lp = client.completions.create(prompt="w6 w17 w13", logprobs=3, **kw).choices[0].logprobs
    assert lp.tokens == want.text.split(" ") and len(lp.top_logprobs[0]) >= 3
    seeded = [
        client.completions.create(model="tiny", prompt="w6 w17 w13", max_tokens=6, temperature=1.0, seed=s)
        .choices[0]
        .text
        for s in (7, 7)
    ]
    assert seeded[0] == seeded[1]


def test_chat(client, text_server):
    kw = dict(model="tiny", messages=CHAT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.role == "assistant" and len(msg.content.split(" ")) == 5 and r.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    lp = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw).choices[0].logprobs
    assert [t.token for t in lp.content] == msg.content.split(" ") and len(lp.content[0].top_logprobs) == 2
    stop = msg.content.split(" ")[1]
    s = client.chat.completions.create(stop=stop, **kw).choices[0]
    assert s.message.content == msg.content[: msg.content.find(stop)] and s.finish_reason == "stop"


def test_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="w6", n=2)
    assert e.value.status_code == 400 and "only n=1" in e.value.message
    with pytest.raises(openai.BadRequestError, match="'frobnicate' is not supported"):
        client.completions.create(model="tiny", prompt="w6", extra_body={"frobnicate": 1})
    with pytest.raises(openai.BadRequestError, match="'tools' is not supported"):
        client.chat.completions.create(
            model="tiny", messages=CHAT, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]
        )
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="w6")
    with pytest.raises(openai.BadRequestError, match="exceeds the KV cache capacity"):
        client.completions.create(model="tiny", prompt="w6 " * 200, max_tokens=1)
