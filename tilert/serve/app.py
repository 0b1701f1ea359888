"""An OpenAI-compatible server (aiohttp) around one `tilert.Engine`.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health.
The event loop never runs model code or anything that grows with the request: JSON decoding,
validation (pydantic, tilert/serve/schema.py), tokenisation and chat templating run in a thread
pool; generation runs on the Engine's worker thread, whose chunk callback hands tokens back to the
loop with `call_soon_threadsafe`. A client that disconnects cancels its request (the handler is
cancelled with the connection, and the engine drops the sequence and frees its cache). Every
error, routing and body-size errors included, is an OpenAI-style JSON error object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from tilert.engine.api import Chunk, Engine, EngineClosedError
from tilert.serve.chat import ChatTemplate, ChatTemplateError, load_chat_template
from tilert.serve.responses import SSE_DONE, Formatter, Prepared, error_body, sse
from tilert.serve.schema import ChatRequest, CompletionRequest, RequestError, parse

log = logging.getLogger("tilert.serve")

MAX_BODY = 8 << 20  # bytes of a request body; larger ones get 413
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _json_error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, EngineClosedError):
        return 503
    if isinstance(exc, ValueError):  # GenerationError, EngineError, TokenizerError, ChatTemplateError
        return 400
    return 500


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
    """Every error as an OpenAI error object: aiohttp's own (404, 405, 413), ours, and crashes."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        msg = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        resp = _json_error(exc.status, f"{msg} ({request.method} {request.path})")
        if "Allow" in exc.headers:  # 405 names the methods that are allowed
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except (RequestError, ValueError, EngineClosedError) as exc:
        return _json_error(_status_of(exc), str(exc), getattr(exc, "param", None))
    except Exception as exc:
        log.exception("request %s %s failed", request.method, request.path)
        return _json_error(500, f"internal error: {type(exc).__name__}: {exc}")


def decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None


class OpenAIApp:
    """The aiohttp handlers; one per Engine."""

    def __init__(self, engine: Engine, chat_template: ChatTemplate | None = None) -> None:
        self.engine, self.chat_template = engine, chat_template
        self.created = int(time.time())

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
        app.add_routes(
            [
                web.get("/v1/models", self.models),
                web.get("/health", self.health),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
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
            "max_model_len": e.max_seq,
            "backend": e.backend_name,
            "world": e.world,
            "vocab_size": e.cfg.vocab_size,
            "speculative": ["dflash"] if e.cfg.dflash is not None else [],
            "tokenizer": e.tokenizer is not None,
            "chat_template": self.chat_template is not None,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()  # 413 past MAX_BODY
        p = await asyncio.get_running_loop().run_in_executor(None, self.prepare_completion, raw)
        return await self._generate(request, p)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        p = await asyncio.get_running_loop().run_in_executor(None, self.prepare_chat, raw)
        return await self._generate(request, p)

    # -- validation, tokenisation, templating (thread pool; no side effects, so safe to abandon) --
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise RequestError(
                f"model {model!r} is not served here (serving {self.engine.model_name!r})", "model", status=404
            )

    def prepare_completion(self, raw: bytes) -> Prepared:
        r = parse(CompletionRequest, decode_json(raw))
        self._check_model(r.model)
        ids = self.engine.encode(r.prompt)
        echo_text = None
        if r.echo:
            tok = self.engine.tokenizer
            echo_text = r.prompt if isinstance(r.prompt, str) else (tok.decode(ids) if tok is not None else "")
        submit = dict(r.sampling(), logprobs=r.logprobs, prompt_logprobs=r.echo and r.logprobs is not None)
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if r.max_tokens is None else r.max_tokens
        return Prepared(
            False, ids, max_tokens, submit, r.stream, r.include_usage, echo_text, r.logprobs is not None, r.model
        )

    def prepare_chat(self, raw: bytes) -> Prepared:
        r = parse(ChatRequest, decode_json(raw))
        self._check_model(r.model)
        if self.engine.tokenizer is None:
            raise RequestError(f"model '{self.engine.model_name}' has no tokenizer; chat needs one", "messages")
        if self.chat_template is None:
            raise RequestError(
                f"model '{self.engine.model_name}' has no chat template (no 'chat_template' in its "
                "tokenizer_config.json); use /v1/completions or serve with --chat-template FILE",
                "messages",
            )
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in r.messages]
        text = self.chat_template.render(messages, add_generation_prompt=r.add_generation_prompt)
        ids = self.engine.encode(text)
        e = self.engine
        block = e.cfg.dflash.block_size if e.cfg.dflash else 1
        max_tokens = r.limit if r.limit is not None else max(0, e.max_seq - len(ids) - block)
        n_top = (r.top_logprobs or 0) if r.logprobs else None
        submit = dict(r.sampling(), logprobs=n_top)
        return Prepared(True, ids, max_tokens, submit, r.stream, r.include_usage, None, r.logprobs, r.model)

    # -- generation (event loop) --
    async def _generate(self, request: web.Request, p: Prepared) -> web.StreamResponse:
        p.model = self.engine.model_name
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Chunk | None] = asyncio.Queue()

        def on_chunk(c: Chunk | None) -> None:  # worker thread -> event loop
            try:
                loop.call_soon_threadsafe(q.put_nowait, c)
            except RuntimeError:  # the loop is closed (server shutting down)
                pass

        req = self.engine.submit(p.prompt_ids, p.max_tokens, on_chunk=on_chunk, **p.submit)
        fmt = Formatter(self.engine, p)
        try:
            if p.stream:
                return await self._stream(request, req, q, fmt)
            while await q.get() is not None:
                pass
            return web.json_response(fmt.result(req.result(timeout=0)))
        finally:
            if not req.done():
                req.cancel()  # the client went away (handler cancelled) or writing failed

    async def _stream(self, request: web.Request, req: Any, q: asyncio.Queue, fmt: Formatter) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        started = False
        while True:
            c = await q.get()
            if not started:  # the prompt's logprobs (echo) exist once the prefill ran
                for ev in fmt.first_events(req.seq.result.prompt_logprobs):
                    await resp.write(sse(ev))
                started = True
            if c is None:
                break
            await resp.write(sse(fmt.chunk_event(c)))
        try:
            r = req.result(timeout=0)
        except Exception as exc:  # the request failed after the stream started: report it in-band
            log.warning("streamed request failed: %s", exc)
            await resp.write(sse(error_body(_status_of(exc), str(exc))))
        else:
            for ev in fmt.final_events(r):
                await resp.write(sse(ev))
        await resp.write(SSE_DONE)
        await resp.write_eof()
        return resp


class Server:
    """Runs the app on its own event-loop thread: `start()` returns once the port is bound."""

    def __init__(
        self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, chat_template: str | Path | None = None
    ) -> None:
        self.engine, self.host, self.port = engine, host, port
        self._template = load_chat_template(engine.tokenizer, chat_template)  # ChatTemplateError: a bad template
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
            app = OpenAIApp(self.engine, self._template).make_app()
            # handler_cancellation: a handler is cancelled when its client disconnects (aiohttp's
            # default keeps it running), which is what cancels the generation of a gone client
            self._runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
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


__all__ = ["ChatTemplateError", "OpenAIApp", "Server"]
