"""An OpenAI-compatible completions server (aiohttp) around one `tilert.Engine`.

The event loop never runs model code: requests go to the Engine's worker thread, whose chunk
callback hands tokens back to the loop with `call_soon_threadsafe`. Greedy decoding only, so
`temperature`/`top_p` are accepted and ignored; `speculative: "dflash"` is our extension field.
A client that goes away mid-stream cancels its request; the engine drops the sequence.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from aiohttp import web

from tilert.engine.api import Chunk, Engine, EngineClosedError, EngineResult

OBJECT = "text_completion"


class BadRequest(ValueError):
    """A malformed completion request; becomes HTTP 400 with the message."""


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


def parse_request(body: Any, engine: Engine) -> dict[str, Any]:
    """Validate a /v1/completions body; returns submit() arguments plus `stream`."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != engine.model_name:
        raise BadRequest(f"model {model!r} is not served here (serving {engine.model_name!r})")
    if "prompt" not in body:
        raise BadRequest("field 'prompt' is required (text or a list of token ids)")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise BadRequest("field 'prompt' must be a string or a list of integer token ids")
    elif not isinstance(prompt, str):
        raise BadRequest("field 'prompt' must be a string or a list of integer token ids")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise BadRequest(f"field 'max_tokens' must be a non-negative integer, got {max_tokens!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("field 'stream' must be true or false")
    spec = body.get("speculative")
    if spec not in (None, "dflash"):
        raise BadRequest(f"field 'speculative' must be null or \"dflash\", got {spec!r}")
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    return {"prompt": prompt, "max_new_tokens": max_tokens, "speculative": spec, "stream": stream}


class CompletionsApp:
    """The aiohttp handlers; one per Engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.created = int(time.time())

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20)
        app.add_routes(
            [
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.post("/v1/completions", self.completions),
            ]
        )
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        e = self.engine
        card = {
            "id": e.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tilert",
            "backend": e.backend_name,
            "world": e.world,
            "vocab_size": e.cfg.vocab_size,
            "speculative": ["dflash"] if e.cfg.dflash is not None else [],
            "tokenizer": e.tokenizer is not None,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"request body is not valid JSON: {exc}")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Chunk | None] = asyncio.Queue()

        def on_chunk(c: Chunk | None) -> None:  # worker thread -> event loop
            try:
                loop.call_soon_threadsafe(q.put_nowait, c)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass

        try:
            args = parse_request(body, self.engine)
            stream = args.pop("stream")
            req = self.engine.submit(**args, on_chunk=on_chunk)
        except EngineClosedError as exc:
            return _error(503, str(exc), "server_error")
        except ValueError as exc:  # BadRequest, GenerationError, EngineError, TokenizerError
            return _error(400, str(exc))
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        try:
            if not stream:
                while await q.get() is not None:
                    pass
                return self._final(cid, req.result(timeout=0))
            return await self._stream(request, cid, req, q)
        except EngineClosedError as exc:
            return _error(503, str(exc), "server_error")
        finally:
            if not req.done():
                req.cancel()  # the client went away (handler cancelled) or writing failed

    def _final(self, cid: str, r: EngineResult) -> web.Response:
        n_prompt = r.stats.get("prompt_tokens", 0)
        return web.json_response(
            {
                "id": cid,
                "object": OBJECT,
                "created": int(time.time()),
                "model": self.engine.model_name,
                "choices": [
                    {
                        "index": 0,
                        "text": r.text or "",
                        "token_ids": r.tokens,
                        "logprobs": None,
                        "finish_reason": r.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": len(r.tokens),
                    "total_tokens": n_prompt + len(r.tokens),
                },
                "tilert": r.stats,
            }
        )

    async def _stream(self, request: web.Request, cid: str, req: Any, q: asyncio.Queue) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def event(tokens: list[int], text: str | None, finish: str | None, extra: dict | None = None) -> bytes:
            d = {
                "id": cid,
                "object": OBJECT,
                "created": int(time.time()),
                "model": self.engine.model_name,
                "choices": [
                    {"index": 0, "text": text or "", "token_ids": tokens, "logprobs": None, "finish_reason": finish}
                ],
            }
            if extra:
                d.update(extra)
            return f"data: {json.dumps(d)}\n\n".encode()

        while (c := await q.get()) is not None:
            await resp.write(event(c.tokens, c.text, None))
        try:
            r = req.result(timeout=0)
        except Exception as exc:  # the request failed after the stream started: report it in-band
            await resp.write(
                f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n".encode()
            )
        else:
            await resp.write(event([], "", r.finish_reason, {"tilert": r.stats}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class Server:
    """Runs the app on its own event-loop thread: `start()` returns once the port is bound."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.engine, self.host, self.port = engine, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        self._thread = threading.Thread(target=self._main, name="tilert-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("server did not start in time")
        if self._error is not None:
            raise OSError(f"cannot serve on {self.host}:{self.port}: {self._error}")
        return self

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._runner = web.AppRunner(CompletionsApp(self.engine).make_app(), shutdown_timeout=1.0)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1] if site._server else self.port  # port 0 -> real
        except BaseException as e:  # report bind errors to start()
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def wait(self) -> None:
        """Block until stop() (or Ctrl-C in the caller)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
