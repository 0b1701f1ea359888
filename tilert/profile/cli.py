"""`python -m tilert profile` (placeholder until written)."""

from __future__ import annotations

from typing import Any


def add_profile_parser(sub: Any) -> None:
    pass
