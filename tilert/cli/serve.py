"""`python -m tilert serve`: an OpenAI-compatible server (completions and chat) on one Engine."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tilert.cli.common import add_checkpoint_args
from tilert.engine.api import Engine

try:  # the serve extra: aiohttp, pydantic, jinja2
    from tilert.serve import app
except ImportError as _e:
    app, _MISSING = None, str(_e)

log = logging.getLogger("tilert.serve")


class ServeError(ValueError):
    """A bad serve option (missing aiohttp, no GPU for --device cuda, port in use)."""


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible /v1/completions and /v1/chat/completions server (aiohttp)")
    p.add_argument("--model", default=None, help="shipped model name (default: the checkpoint's config, else tiny)")
    p.add_argument("--config", default=None, help="path to a config.json (overrides --model)")
    p.add_argument("--weights", default=None, help="checkpoint (HF safetensors or `tilert quantize` output dir)")
    add_checkpoint_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic weights when --weights is not given")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="reference", help="step backend (reference; eager/persistent on GPUs)")
    p.add_argument("--plan", default=None, help="compiled plan directory")
    p.add_argument(
        "--drafter",
        default=None,
        help="DFlash drafter directory (published layout; default: the checkpoint's dflash/, if any)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's, if any)")
    p.add_argument("--chat-template", default=None,
                   help="jinja chat template file (default: chat_template of tokenizer_config.json)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-seq", type=int, default=1024, help="KV cache capacity per sequence (tokens)")
    p.add_argument("--max-active", type=int, default=8, help="sequences decoded concurrently (KV cache slots)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="memory the KV caches may use (default: 80%% of available RAM, "
                        "90%% of free GPU memory)")  # fmt: skip
    p.add_argument("--batching", default="auto", choices=["auto", "on", "off"],
                   help="continuous batching: auto (on for the reference backend), on, off")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(fn=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if app is None:
        raise ServeError(f"serving needs aiohttp, pydantic and jinja2: pip install 'tilert[serve]' ({_MISSING})")
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tilert").setLevel(args.log_level.upper())
    if args.kv_cache_gb is not None and args.kv_cache_gb < 0:
        raise ServeError(f"--kv-cache-gb must be >= 0, got {args.kv_cache_gb}")
    model = args.config or args.model or (None if args.weights else "tiny")
    engine = Engine(
        model,
        args.weights if args.weights else args.seed,
        plan=args.plan,
        backend=args.backend,
        device=args.device,
        max_seq=args.max_seq,
        max_active=args.max_active,
        tokenizer=args.tokenizer,
        quantize=args.quantize,
        verify_checksums=not args.no_verify_checksums,
        drafter=args.drafter,
        kv_memory=None if args.kv_cache_gb is None else int(args.kv_cache_gb * (1 << 30)),
        batching={"auto": None, "on": True, "off": False}[args.batching],
    )
    with engine:
        try:
            server = app.Server(engine, args.host, args.port, chat_template=args.chat_template).start()
        except OSError as e:
            raise ServeError(str(e)) from None
        log.info("serving %s (%s, %s) on %s", engine.model_name, engine.backend_name, args.device, server.url)
        try:
            server.wait()
        except KeyboardInterrupt:
            log.info("shutting down")
        finally:
            server.stop()
    return 0
