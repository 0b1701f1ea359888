"""The OpenAI-compatible server over real HTTP on loopback (ephemeral port, bounded timeouts)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("aiohttp", reason="serving needs aiohttp (pip install 'tilert[serve]')")

from tilert.cli import main  # noqa: E402
from tilert.engine.api import Engine  # noqa: E402
from tilert.serve.app import Server  # noqa: E402

PROMPTS = [[5, 17, 3], [99, 42], [1, 2, 3, 4, 5, 6], [150, 7]]
TIMEOUT = 60


@pytest.fixture(scope="module")
def server():
    with Engine("tiny", 3, max_seq=128, max_active=4) as eng, Server(eng, "127.0.0.1", 0) as srv:
        yield srv


def post(srv: Server, body: object, raw: bytes | None = None) -> tuple[int, dict | str]:
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=TIMEOUT)
    data = raw if raw is not None else json.dumps(body).encode()
    c.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    if r.getheader("Content-Type", "").startswith("text/event-stream"):
        return r.status, text
    return r.status, json.loads(text)


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: ")
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_models(server):
    c = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    c.request("GET", "/v1/models")
    d = json.loads(c.getresponse().read())
    assert d["object"] == "list" and d["data"][0]["id"] == "tiny" and d["data"][0]["speculative"] == ["dflash"]


def test_concurrent_requests_match_sequential(server):
    bodies = [{"prompt": p, "max_tokens": 7, "speculative": s} for p in PROMPTS for s in (None, "dflash")]
    sequential = [post(server, b)[1]["choices"][0]["token_ids"] for b in bodies]
    with ThreadPoolExecutor(8) as ex:
        concurrent = [r[1]["choices"][0]["token_ids"] for r in ex.map(lambda b: post(server, b), bodies)]
    assert concurrent == sequential
    assert all(len(t) == 7 for t in sequential)
    assert sequential[0] == sequential[1]  # DFlash is lossless


def test_stream_sse(server):
    status, d = post(server, {"prompt": PROMPTS[0], "max_tokens": 7})
    assert status == 200 and d["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    status, text = post(server, {"prompt": PROMPTS[0], "max_tokens": 7, "stream": True, "speculative": "dflash"})
    ev = sse_events(text)
    assert status == 200 and ev[-1] == "[DONE]"
    assert [t for e in ev[:-1] for t in e["choices"][0]["token_ids"]] == d["choices"][0]["token_ids"]
    assert ev[-2]["choices"][0]["finish_reason"] == "length" and "tilert" in ev[-2]


@pytest.mark.parametrize(
    "body, raw, needle",
    [
        (None, b"{not json", "not valid JSON"),
        ({"max_tokens": 3}, None, "'prompt' is required"),
        ({"prompt": [1, 999]}, None, "outside the vocabulary"),
        ({"prompt": [1], "max_tokens": -1}, None, "'max_tokens'"),
        ({"prompt": [1.5]}, None, "list of integer token ids"),
        ({"prompt": "hello"}, None, "no tokenizer"),
        ({"prompt": [1], "speculative": "medusa"}, None, "'speculative'"),
        ({"prompt": [1], "model": "gpt-4"}, None, "not served here"),
        ([1, 2], None, "JSON object"),
    ],
)
def test_malformed_requests_get_400(server, body, raw, needle):
    status, d = post(server, body, raw)
    assert status == 400 and needle in d["error"]["message"]


def test_client_disconnect_mid_stream(server):
    body = json.dumps({"prompt": PROMPTS[2], "max_tokens": 100, "stream": True}).encode()
    s = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert b"data: " in s.recv(4096) + s.recv(4096)
    s.close()  # go away mid-stream
    status, d = post(server, {"prompt": PROMPTS[1], "max_tokens": 3})
    assert status == 200 and len(d["choices"][0]["token_ids"]) == 3
    eng = server.engine
    for _ in range(200):  # the abandoned sequence is dropped, not decoded to the end
        if eng.idle():
            break
        threading.Event().wait(0.05)
    assert eng.idle()


def test_serve_cuda_without_gpu_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["serve", "--model", "tiny", "--device", "cuda", "--port", "0"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
