"""Progress bars and CLI logging for long jobs (quantize, compile, checkpoint loads).

Bars are tqdm on stderr, shown only when stderr is a terminal, and never with `--quiet` or
TILERT_QUIET=1, so tests, pipes and CI logs stay clean. Informational messages go through
`logging` ("tilert.*" loggers); `configure_logging` gives the CLI a plain stderr handler.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence bars and info messages for this process (the CLI's --quiet)."""
    global _quiet
    _quiet = quiet


def quiet() -> bool:
    return _quiet or os.environ.get("TILERT_QUIET", "") not in ("", "0")


def bars_enabled() -> bool:
    return not quiet() and sys.stderr.isatty()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@contextmanager
def progress(total: int | None = None, desc: str = "", unit: str = "it", **kw: Any) -> Iterator[Any]:
    """A tqdm bar on stderr (or a no-op with the same `update`) for a loop of `total` steps (0: no bar)."""
    if not bars_enabled() or total == 0:
        yield _NoBar()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)
    try:
        yield bar
    finally:
        bar.close()


def configure_logging(quiet_flag: bool = False) -> None:
    """CLI logging: 'tilert' loggers print info lines on stderr (warnings only when quiet)."""
    set_quiet(quiet_flag)
    logger = logging.getLogger("tilert")
    logger.setLevel(logging.WARNING if quiet() else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests swap it)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass
