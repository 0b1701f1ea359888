"""Shared pieces of the server tests: a word-level test tokenizer with a ChatML template, servers
on ephemeral loopback ports, and small HTTP helpers with bounded timeouts."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

TIMEOUT = 60
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
EOS = 2  # <|im_end|>


def write_tokenizer(directory: Path, vocab_size: int = 160, chat_template: str | None = CHATML) -> Path:
    """tokenizer.json (words w6 .. w{V-1} plus ChatML specials; decode joins words with spaces) and,
    with a chat template, tokenizer_config.json declaring it and the EOS token. Returns tokenizer.json."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": EOS, "user": 3, "assistant": 4, "system": 5}
    vocab.update({f"w{i}": i for i in range(6, vocab_size)})
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if chat_template is not None:
        cfg = {"chat_template": chat_template, "eos_token": "<|im_end|>", "bos_token": None}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory / "tokenizer.json"


def request(srv, method: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, object, dict]:
    """(status, decoded JSON or the SSE text, headers)."""
    c = http.client.HTTPConnection(srv.host, srv.port, timeout=TIMEOUT)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    headers = dict(r.getheaders())
    if r.getheader("Content-Type", "").startswith("text/event-stream"):
        return r.status, text, headers
    return r.status, json.loads(text), headers


def post(srv, body: object, path: str = "/v1/completions", raw: bytes | None = None) -> tuple[int, object]:
    status, d, _ = request(srv, "POST", path, body, raw)
    return status, d


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: ")
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def raw_post(srv, path: str, body: object) -> socket.socket:
    """Send a request on a bare socket (so the test can walk away from it)."""
    s = socket.create_connection((srv.host, srv.port), timeout=TIMEOUT)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    s.sendall(head.encode() + data)
    return s


def wait_until(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    t_end = time.perf_counter() + timeout
    while time.perf_counter() < t_end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()
