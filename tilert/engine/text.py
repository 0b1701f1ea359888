"""The text side of a generation: incremental detokenisation with stop strings, and the end-of-
sequence token ids a checkpoint declares."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TextStream:
    """Turns a growing list of token ids into text, handed out in deltas.

    Each token is decoded in a short window (the tokens since the last complete piece of text), so
    a step costs O(window) and the deltas add up to `tokenizer.decode(ids)`. A window whose text
    ends in an incomplete UTF-8 sequence (U+FFFD) waits for the next token. With stop strings the
    text never holds a stop string or anything after it, and `delta()` holds back the last
    len(longest stop) - 1 characters while they could still begin one.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = self._read = self._sent = 0

    def add(self, token: int) -> bool:
        """Append one token; True when the text now reaches a stop string (it is cut before it)."""
        self.ids.append(token)
        return self._decode(final=False)

    def finish(self) -> bool:
        """Decode whatever is still pending (an unfinished UTF-8 sequence at the end)."""
        return self._decode(final=True)

    def delta(self, final: bool = False) -> str:
        """The text not handed out yet; unless final (or stopped), less what may still begin a stop string."""
        end = len(self.text) if final or self.stopped else max(self._sent, len(self.text) - self._hold)
        d, self._sent = self.text[self._sent : end], end
        return d

    def _decode(self, final: bool) -> bool:
        if self.stopped or self._read == len(self.ids):
            return self.stopped
        before = self.tokenizer.decode(self.ids[self._prefix : self._read])
        now = self.tokenizer.decode(self.ids[self._prefix :])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return False
        start = max(0, len(self.text) - self._hold)  # a stop string completed now begins here or later
        self.text += now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        return self.stopped


def _special_token(cfg: dict, key: str) -> str | None:
    v = cfg.get(key)
    if isinstance(v, dict):  # tokenizer_config.json may store an AddedToken: {"content": ...}
        v = v.get("content")
    return v if isinstance(v, str) else None


def _ids_field(v: Any) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        return [t for t in v if isinstance(t, int) and not isinstance(t, bool)]
    return []


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def tokenizer_config(tokenizer: Any) -> dict:
    """tokenizer_config.json next to a tokenizer's tokenizer.json ({} if none)."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        return {}
    return _read_json(Path(path).parent / "tokenizer_config.json")


def find_eos_token_ids(directories: Iterable[Path], cfg: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id a checkpoint declares, as serving engines collect them: the model
    config's `eos_token_id` (an int or a list), config.json and generation_config.json next to the
    checkpoint, and the tokenizer's `eos_token` from tokenizer_config.json."""
    ids = _ids_field(getattr(cfg, "eos_token_id", None))
    for d in directories:
        for name in ("config.json", "generation_config.json"):
            ids += _ids_field(_read_json(d / name).get("eos_token_id"))
    if tokenizer is not None:
        tok = _special_token(tokenizer_config(tokenizer), "eos_token")
        if tok is not None and hasattr(tokenizer, "token_id"):
            tid = tokenizer.token_id(tok)
            if tid is not None:
                ids.append(int(tid))
    return sorted(set(ids))
