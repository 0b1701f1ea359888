"""tilert: a tile-level kernel compiler and runtime for low-latency MoE decoding.

`import tilert` stays cheap (no torch): public names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Engine": "tilert.engine.api",
    "EngineResult": "tilert.engine.api",
    "register_backend": "tilert.engine.api",
    "load_config": "tilert.models.config",
}

__all__ = ["Engine", "EngineResult", "__version__", "load_config", "register_backend"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tilert' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
