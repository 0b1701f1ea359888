"""Chat prompts: the checkpoint's own chat template, rendered with jinja2 as HF tokenizers do.

The template comes from `chat_template` in tokenizer_config.json next to the tokenizer (a string,
or a list of named templates: "default" is used), else from chat_template.jinja there, else from
a file given explicitly. Rendering follows transformers' `apply_chat_template`: a sandboxed
environment with trim_blocks/lstrip_blocks, `raise_exception`, a `tojson` that keeps non-ASCII,
the tokenizer's special tokens as variables, and `add_generation_prompt`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tilert.engine.text import tokenizer_config


class ChatTemplateError(ValueError):
    """No chat template, an unreadable one, or one that refused the messages."""


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ChatTemplateError("chat templates need jinja2: pip install 'tilert[serve]'") from None

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"chat template: {message}")

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template does not compile: {e}") from None
        self._jinja_error = jinja2.TemplateError
        self.special_tokens = dict(special_tokens or {})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except ChatTemplateError:
            raise
        except self._jinja_error as e:
            raise ChatTemplateError(f"chat template failed on these messages: {e}") from None


def _token(cfg: dict, key: str) -> str | None:
    v = cfg.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_chat_template(tokenizer: Any, path: str | Path | None = None) -> ChatTemplate | None:
    """The chat template of a tokenizer's checkpoint (or the file at `path`); None if it has none."""
    cfg = tokenizer_config(tokenizer) if tokenizer is not None else {}
    special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token") if (t := _token(cfg, k))}
    if path is not None:
        try:
            return ChatTemplate(Path(path).read_text(), special)
        except OSError as e:
            raise ChatTemplateError(f"cannot read chat template {path}: {e}") from None
    source = cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default", next(iter(named.values()), None))
    if not isinstance(source, str) and tokenizer is not None and getattr(tokenizer, "path", None) is not None:
        jinja_file = Path(tokenizer.path).parent / "chat_template.jinja"
        source = jinja_file.read_text() if jinja_file.is_file() else None
    return ChatTemplate(source, special) if isinstance(source, str) else None
