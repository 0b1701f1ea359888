"""The OpenAI-compatible server over real HTTP on loopback (ephemeral ports, bounded timeouts)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.serve.helpers import EOS, TIMEOUT, post, raw_post, request, sse_events, wait_until
from tilert.cli import main
from tilert.serve.app import OpenAIApp
from tilert.serve.chat import load_chat_template
from tilert.serve.schema import RequestError

PROMPTS = [[5, 17, 3], [99, 42], [1, 2, 3, 4, 5, 6], [150, 7]]
CHAT = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": [{"type": "text", "text": "w7 w8"}]}]


def tokens(d: dict) -> list[int]:
    return d["choices"][0]["token_ids"]


def test_models(server):
    status, d, _ = request(server, "GET", "/v1/models")
    card = d["data"][0]
    assert status == 200 and d["object"] == "list" and card["id"] == "tiny" and card["speculative"] == ["dflash"]
    assert card["max_model_len"] == 128 and card["chat_template"] is False


def test_concurrent_requests_match_sequential(server):
    bodies = [
        {"prompt": p, "max_tokens": 7, "speculative": s, **t}
        for p in PROMPTS
        for s in (None, "dflash")
        for t in ({"temperature": 0}, {"temperature": 0.8, "seed": 5})
    ]
    sequential = [tokens(post(server, b)[1]) for b in bodies]
    with ThreadPoolExecutor(8) as ex:
        concurrent = [tokens(r[1]) for r in ex.map(lambda b: post(server, b), bodies)]
    assert concurrent == sequential
    assert all(len(t) == 7 for t in sequential)
    assert sequential[0] == sequential[2]  # greedy DFlash is lossless


def test_stream_sse_and_usage(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 7, "temperature": 0}
    status, d = post(server, body)
    assert status == 200 and d["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    status, text = post(server, dict(body, stream=True, speculative="dflash"))
    ev = sse_events(text)
    assert status == 200 and ev[-1] == "[DONE]" and all("usage" not in e for e in ev[:-1])
    assert [t for e in ev[:-1] for t in e["choices"][0]["token_ids"]] == tokens(d)
    assert ev[-2]["choices"][0]["finish_reason"] == "length" and "tilert" in ev[-2]
    _, text = post(server, dict(body, stream=True, stream_options={"include_usage": True}))
    ev = sse_events(text)
    assert ev[-2]["choices"] == [] and ev[-2]["usage"] == d["usage"]
    assert all(e["usage"] is None for e in ev[:-2])


def test_sampling_is_seeded_and_greedy_matches_the_engine(server):
    greedy = server.engine.generate(PROMPTS[2], 8).tokens
    assert tokens(post(server, {"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0})[1]) == greedy
    body = {"prompt": PROMPTS[2], "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 20}
    runs = [tokens(post(server, dict(body, seed=s))[1]) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]
    unseeded = {tuple(tokens(post(server, body)[1])) for _ in range(3)}
    assert len(unseeded) > 1  # the default temperature is 1 (OpenAI): unseeded requests differ


def test_logprobs_and_echo_in_completions_format(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0, "logprobs": 2}
    _, d = post(server, body)
    lp = d["choices"][0]["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in tokens(d)] and len(lp["token_logprobs"]) == 3
    assert all(len(top) in (2, 3) and max(top.values()) <= 0 for top in lp["top_logprobs"])
    assert all(lp["token_logprobs"][i] == max(top.values()) for i, top in enumerate(lp["top_logprobs"]))  # greedy
    _, e = post(server, dict(body, echo=True))
    lpe = e["choices"][0]["logprobs"]
    assert lpe["token_logprobs"][0] is None and len(lpe["tokens"]) == 6
    assert lpe["token_logprobs"][3:] == lp["token_logprobs"]
    _, text = post(server, dict(body, echo=True, stream=True))
    ev = sse_events(text)[:-1]
    assert ev[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    streamed = [x for v in ev for x in (v["choices"][0]["logprobs"] or {}).get("token_logprobs", [])]
    assert streamed == lpe["token_logprobs"]
    _, z = post(server, {"prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert z["choices"][0]["logprobs"]["token_logprobs"] == lpe["token_logprobs"][:3]  # scoring a prompt


@pytest.mark.parametrize(
    "body, needle, param",
    [
        ({"max_tokens": 3}, "field 'prompt' is required", "prompt"),
        ({"prompt": [1, 999]}, "outside the vocabulary", None),
        ({"prompt": [1], "max_tokens": -1}, "field 'max_tokens'", "max_tokens"),
        ({"prompt": [1], "max_tokens": True}, "field 'max_tokens'", "max_tokens"),
        ({"prompt": [1.5]}, "list of integer token ids", "prompt"),
        ({"prompt": [[1], [2]]}, "batch of several prompts", "prompt"),
        ({"prompt": "hello"}, "no tokenizer", None),
        ({"prompt": [1], "speculative": "medusa"}, "field 'speculative'", "speculative"),
        ({"prompt": [1], "n": 2}, "only n=1", "n"),
        ({"prompt": [1], "best_of": 3}, "best_of", "best_of"),
        ({"prompt": [1], "logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias"),
        ({"prompt": [1], "suffix": "x"}, "suffix", "suffix"),
        ({"prompt": [1], "presence_penalty": 0.5}, "penalties", "presence_penalty"),
        ({"prompt": [1], "tools": []}, "field 'tools' is not supported", "tools"),
        ({"prompt": [1], "temperature": "hot"}, "field 'temperature'", "temperature"),
        ({"prompt": [1], "temperature": 2.5}, "field 'temperature'", "temperature"),
        ({"prompt": [1], "top_p": 0}, "field 'top_p'", "top_p"),
        ({"prompt": [1], "logprobs": 21}, "field 'logprobs'", "logprobs"),
        ({"prompt": [1], "stream_options": {"include_usage": True}}, "only allowed with stream", None),
        ({"prompt": [1], "stream": True, "stream_options": {"x": 1}}, "'stream_options.x' is not supported", None),
        ({"prompt": [1], "stop": "w5"}, "stop strings need a tokenizer", None),
        ({"prompt": [1], "stop_token_ids": [500]}, "stop token id 500", None),
        ({"prompt": [1] * 200}, "exceeds the KV cache capacity", None),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, body, needle, param):
    status, d = post(server, body)
    assert status == 400 and needle in d["error"]["message"], d
    assert d["error"]["type"] == "invalid_request_error" and d["error"]["code"] == 400
    if param is not None:
        assert d["error"]["param"] == param


def test_json_error_bodies_for_every_status(server):
    for raw, status, needle in [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (b'{"prompt": "' + b"w" * (9 << 20) + b'"}', 413, "body size"),
    ]:
        got, d = post(server, None, raw=raw)
        assert got == status and needle in d["error"]["message"], (status, d)
    status, d, _ = request(server, "GET", "/nope")
    assert status == 404 and d["error"]["type"] == "not_found_error"
    status, d, headers = request(server, "GET", "/v1/completions")
    assert status == 405 and "POST" in headers.get("Allow", "") and d["error"]["code"] == 405
    status, d = post(server, {"prompt": [1], "model": "gpt-4"})
    assert status == 404 and "not served here" in d["error"]["message"] and d["error"]["param"] == "model"


def test_step_failures_are_json_errors(server):
    eng = server.engine
    real = eng.backend.mixed_step  # the server's engine runs every round as one mixed step

    def poisoned(tokens, positions, slots):
        out = real(tokens, positions, slots)
        return dict(out, logits=torch.full_like(out["logits"], float("inf"))) if int(tokens[0]) == 77 else out

    eng.backend.mixed_step = poisoned
    try:
        status, d = post(server, {"prompt": [77, 1], "max_tokens": 3})
        assert status == 500 and "non-finite logits" in d["error"]["message"] and d["error"]["type"] == "server_error"
        status, text = post(server, {"prompt": [77, 1], "max_tokens": 3, "stream": True})
        ev = sse_events(text)
        assert status == 200 and "non-finite logits" in ev[-2]["error"]["message"] and ev[-1] == "[DONE]"
    finally:
        eng.backend.mixed_step = real
    assert post(server, {"prompt": [5, 1], "max_tokens": 2})[0] == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_disconnected_clients_cancel_their_requests(server, text_server, chat, stream):
    """Requests whose clients went away stop generating and free their caches: with every slot
    taken by abandoned 100-token requests, the next short request still runs at once."""
    srv = text_server if chat else server
    eng = srv.engine
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"messages": CHAT} if chat else {"prompt": PROMPTS[2]}
    body.update(max_tokens=100, stream=stream, temperature=0, ignore_eos=True)
    assert wait_until(eng.idle)
    before = eng.counters["cancelled"]
    socks = [raw_post(srv, path, body) for _ in range(eng.max_active)]
    assert wait_until(lambda: eng.kv_caches_live == eng.max_active and eng.counters["steps"] > 0)
    for s in socks:
        s.close()
    status, d = post(srv, dict(body, max_tokens=2, stream=False), path)
    assert status == 200 and d["usage"]["completion_tokens"] == 2
    assert wait_until(eng.idle, 10)
    assert eng.counters["cancelled"] - before == eng.max_active and eng.kv_caches_live == 0


# ---- with a tokenizer: text, stop, EOS, chat ---------------------------------------------------


def test_text_prompts_stop_strings_and_eos(text_server):
    body = {"prompt": "w6 w17 w13", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    _, d = post(text_server, body)
    text = d["choices"][0]["text"]
    assert text == " ".join(text_server.engine.tokenizer.decode([t]) for t in tokens(d))
    stop = text.split(" ")[3]
    _, s = post(text_server, dict(body, stop=[stop, "w999"]))
    assert s["choices"][0]["text"] == text[: text.find(stop)] and s["choices"][0]["finish_reason"] == "stop"
    _, st = post(text_server, dict(body, stop=stop, stream=True))
    ev = sse_events(st)[:-1]
    assert "".join(e["choices"][0]["text"] for e in ev) == s["choices"][0]["text"]
    assert ev[-1]["choices"][0]["finish_reason"] == "stop"
    ids = tokens(d)
    _, t = post(text_server, dict(body, stop_token_ids=[ids[2]], echo=True))
    assert tokens(t) == ids[: ids.index(ids[2]) + 1] and t["choices"][0]["finish_reason"] == "stop"
    assert t["choices"][0]["text"] == "w6 w17 w13" + " ".join(text.split(" ")[: ids.index(ids[2])])
    assert text_server.engine.eos_token_ids == {EOS}


def test_eos_ends_generation(text_server):
    eng = text_server.engine
    real = eng.backend.mixed_step  # the server's engine runs every round as one mixed step

    def eos_after_two(tokens, positions, slots):  # the model "predicts" EOS for position 5 on
        out = real(tokens, positions, slots)
        logits = out["logits"].clone()
        logits[positions >= 4, EOS] = 1e4
        return dict(out, logits=logits, next_tokens=torch.argmax(logits, -1).to(torch.int32))

    eng.backend.mixed_step = eos_after_two
    try:
        body = {"prompt": "w6 w17 w13", "max_tokens": 8, "temperature": 0.5, "seed": 1}
        _, d = post(text_server, body)
        assert tokens(d)[-1] == EOS and len(tokens(d)) == 3 and d["choices"][0]["finish_reason"] == "stop"
        assert "<|im_end|>" not in d["choices"][0]["text"]
        _, d = post(text_server, dict(body, ignore_eos=True))
        assert len(tokens(d)) == 8 and d["choices"][0]["finish_reason"] == "length"
    finally:
        eng.backend.mixed_step = real


def test_chat_completions(text_server):
    eng = text_server.engine
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    status, d = post(text_server, body, "/v1/chat/completions")
    prompt = "<|im_start|>system w9 w10<|im_end|> <|im_start|>user w7 w8<|im_end|> <|im_start|>assistant "
    want = eng.generate(prompt, 6, ignore_eos=True)
    assert status == 200 and d["object"] == "chat.completion" and d["id"].startswith("chatcmpl-")
    msg = d["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": want.text}
    assert d["usage"]["prompt_tokens"] == len(eng.encode(prompt))
    _, text = post(text_server, dict(body, stream=True, stream_options={"include_usage": True}), "/v1/chat/completions")
    ev = sse_events(text)
    assert ev[0]["object"] == "chat.completion.chunk"
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-2]) == want.text
    assert ev[-3]["choices"][0]["finish_reason"] == "length" and ev[-2]["usage"] == d["usage"]
    _, lp = post(text_server, dict(body, logprobs=True, top_logprobs=2), "/v1/chat/completions")
    content = lp["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == want.text.split(" ") and all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    p = OpenAIApp(eng, load_chat_template(eng.tokenizer)).prepare_chat(json.dumps({"messages": CHAT}).encode())
    assert len(p.prompt_ids) + p.max_tokens == eng.max_seq - eng.cfg.dflash.block_size  # no max_tokens: what fits


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"messages": []}, "field 'messages'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "'messages.0.tool_calls' is not"),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, "field 'tools' is not supported"),
        ({"messages": CHAT, "top_logprobs": 2}, "needs logprobs"),
        ({"messages": CHAT, "echo": True}, "field 'echo' is not supported"),
    ],
)
def test_bad_chat_requests(text_server, body, needle):
    status, d = post(text_server, body, "/v1/chat/completions")
    assert status == 400 and needle in d["error"]["message"], d


def test_chat_needs_a_tokenizer_and_a_template(server, text_server):
    status, d = post(server, {"messages": CHAT}, "/v1/chat/completions")
    assert status == 400 and "no tokenizer" in d["error"]["message"]
    app = OpenAIApp(text_server.engine, None)
    with pytest.raises(RequestError, match="has no chat template"):
        app.prepare_chat(json.dumps({"messages": CHAT}).encode())


def test_tokenisation_runs_off_the_event_loop(text_server):
    """/health answers while a prompt is being tokenised (here: a tokeniser that waits)."""
    tok = text_server.engine.tokenizer
    entered, release = threading.Event(), threading.Event()

    def slow_encode(text):
        entered.set()
        release.wait(TIMEOUT)
        return type(tok).encode(tok, text)

    tok.encode = slow_encode
    try:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(post, text_server, {"prompt": "w6 w7", "max_tokens": 1, "temperature": 0})
            assert entered.wait(TIMEOUT)
            status, d, _ = request(text_server, "GET", "/health")
            assert status == 200 and d == {"status": "ok"} and not fut.done()
            release.set()
            assert fut.result(TIMEOUT)[0] == 200
    finally:
        release.set()
        del tok.encode


def test_serve_refuses_a_kv_cache_that_cannot_fit(capsys):
    assert main(["serve", "--max-seq", "1048576", "--kv-cache-gb", "2", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "KV cache does not fit: max_seq=1048576 x max_active=8" in err
    assert "budget 2.00 GiB" in err


def test_serve_cuda_without_gpu_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["serve", "--model", "tiny", "--device", "cuda", "--port", "0"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err

