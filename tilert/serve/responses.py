"""Response bodies in the OpenAI formats: completions and chat, whole and streamed (SSE chunks).

`Prepared` is a validated request ready for `Engine.submit`; `Formatter` turns engine chunks and
results into the JSON objects of its endpoint, keeping the running state a stream needs (text
offsets of completion logprobs, whether the chat role was sent).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tilert.engine.api import Chunk, Engine, EngineResult, TokenLogprob


@dataclass
class Prepared:
    """A request after validation, tokenisation and (for chat) templating."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    submit: dict[str, Any]  # Engine.submit keyword arguments
    stream: bool = False
    include_usage: bool = False
    echo_text: str | None = None  # completions with echo: the prompt's text
    logprobs: bool = False  # whether responses carry logprobs
    model: str = ""


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Formatter:
    engine: Engine
    p: Prepared
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _offset: int = 0  # completion logprobs: text offset of the next token
    _role_sent: bool = False

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.p.chat else "cmpl-") + uuid.uuid4().hex[:24]

    # -- pieces --
    def token_str(self, t: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([t]) if tok is not None else f"token_id:{t}"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        n = len(self.p.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.p.chat else "text_completion") + (".chunk" if chunk and self.p.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.p.model}

    def completion_logprobs(self, entries: list[TokenLogprob | None], tokens: list[int]) -> dict[str, Any]:
        """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} (OpenAI completions)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in zip(tokens, entries):
            s = self.token_str(t)
            out["tokens"].append(s)
            out["text_offset"].append(self._offset)
            self._offset += len(s)
            if e is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(e.logprob)
            top = {self.token_str(a): lp for a, lp in e.top}
            top.setdefault(s, e.logprob)
            out["top_logprobs"].append(top)
        return out

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """{"content": [{"token", "logprob", "bytes", "top_logprobs"}]} (OpenAI chat)."""

        def item(t: int, lp: float) -> dict[str, Any]:
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {
            "content": [dict(item(e.token, e.logprob), top_logprobs=[item(a, lp) for a, lp in e.top]) for e in entries]
        }

    # -- whole responses --
    def result(self, r: EngineResult) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.p.chat:
            choice["message"] = {"role": "assistant", "content": r.text or ""}
            choice["logprobs"] = self.chat_logprobs(r.logprobs or []) if self.p.logprobs else None
        else:
            echo = self.p.echo_text
            choice["text"] = (echo or "") + (r.text or "")
            choice["token_ids"] = r.tokens
            lp = None
            if self.p.logprobs:
                entries: list[TokenLogprob | None] = list(r.logprobs or [])
                tokens = list(r.tokens)
                if echo is not None:
                    entries, tokens = list(r.prompt_logprobs or []) + entries, r.prompt + tokens
                lp = self.completion_logprobs(entries, tokens)
            choice["logprobs"] = lp
        choice["finish_reason"] = r.finish_reason
        return dict(self._head(False), choices=[choice], usage=self.usage(len(r.tokens)), tilert=r.stats)

    # -- stream events --
    def _event(self, text: str, tokens: list[int], lp: Any, finish: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.p.chat:
            delta: dict[str, Any] = {} if finish is not None and not text else {"content": text}
            if not self._role_sent:
                delta = {"role": "assistant", **delta}
                self._role_sent = True
            choice["delta"] = delta
        else:
            choice["text"] = text
            choice["token_ids"] = tokens
        choice["logprobs"] = lp
        choice["finish_reason"] = finish
        d = dict(self._head(True), choices=[choice])
        if self.p.include_usage:
            d["usage"] = None
        return d

    def first_events(self, prompt_logprobs: list[TokenLogprob | None] | None) -> list[dict[str, Any]]:
        """What a stream sends before any token: the chat role, or the echoed prompt."""
        if self.p.chat:
            return [self._event("", [], None, None)]
        if self.p.echo_text is None:
            return []
        lp = None
        if self.p.logprobs:
            lp = self.completion_logprobs(list(prompt_logprobs or []), self.p.prompt_ids)
        return [self._event(self.p.echo_text, [], lp, None)]

    def chunk_event(self, c: Chunk) -> dict[str, Any]:
        lp = None
        if self.p.logprobs:
            entries = c.logprobs or []
            lp = self.chat_logprobs(entries) if self.p.chat else self.completion_logprobs(list(entries), c.tokens)
        return self._event(c.text or "", c.tokens, lp, None)

    def final_events(self, r: EngineResult) -> list[dict[str, Any]]:
        last = self._event("", [], None, r.finish_reason)
        last["tilert"] = r.stats
        events = [last]
        if self.p.include_usage:
            events.append(dict(self._head(True), choices=[], usage=self.usage(len(r.tokens))))
        return events


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    kind = {404: "not_found_error", 503: "service_unavailable_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
