"""Typed node attributes: every op kind declares a frozen dataclass of its attributes.

A field's default is the kind's default, written once here; a node's stored attributes (the JSON
and text forms) are the ones its builder or pass set, and `Node.a` is them parsed into the kind's
class with the defaults filled in. `parse` rejects an unknown name, a missing required one or a
value of the wrong type, naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from tilert.ir.value import IRError


@dataclasses.dataclass(frozen=True)
class Attrs:
    """No attributes. Subclasses are frozen, keyword-only dataclasses (`@attrs`): their fields are the
    kind's attributes."""

    @classmethod
    def parse(cls, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Attrs:
        """The attributes `items` as this class; IRError names an unknown, missing or mistyped one."""
        given = dict(items)
        hints = _hints(cls)
        unknown = sorted(set(given) - set(hints))
        if unknown:
            known = ", ".join(hints) or "none"
            raise IRError(f"unknown attribute {unknown[0]!r} (known: {known})")
        for name, value in given.items():
            if not _fits(value, hints[name]):
                raise IRError(f"attribute {name!r} = {value!r} is not {_show(hints[name])}")
        try:
            return cls(**given)
        except TypeError:
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in given
                       and f.default is dataclasses.MISSING]  # fmt: skip
            raise IRError(f"missing attribute {missing[0]!r}") from None

    def kwargs(self) -> dict[str, Any]:
        """Every field by name: the keyword arguments of the kind's reference."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def attrs(cls: type) -> type[Attrs]:
    """Class decorator: an op kind's attributes as a frozen, keyword-only dataclass."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 1.0 as 1.0, but a builder may give an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, h) for v, h in zip(value, args))
    return isinstance(value, hint)


def _show(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
