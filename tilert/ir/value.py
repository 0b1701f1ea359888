"""IR values: named, typed, sharded tensors (activations, inputs, params, state), and IRError.

Kept apart from the graph so the op registry (which infers values) sits below it: graph.py's
verifier asks the registry about every node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tilert.ir.dtypes import DType


class IRError(ValueError):
    """A malformed graph; the message names the node or value at fault."""


@dataclass(frozen=True)
class Sharding:
    """How a value is spread over ranks: replicated, split along a dim, or a partial reduction."""

    kind: str = "R"  # R | S | P
    dim: int = -1  # for S
    reduce: str = "sum"  # for P: sum | argmax

    def __str__(self) -> str:
        return {"R": "R", "S": f"S({self.dim})", "P": f"P({self.reduce})"}[self.kind]

    @staticmethod
    def parse(s: str) -> Sharding:
        if s == "R":
            return REPLICATED
        if s.startswith("S(") and s.endswith(")"):
            return Sharding("S", int(s[2:-1]))
        if s.startswith("P(") and s.endswith(")"):
            return Sharding("P", reduce=s[2:-1])
        raise IRError(f"bad sharding '{s}'")


REPLICATED = Sharding()


@dataclass(frozen=True)
class Value:
    name: str
    shape: tuple[int, ...]
    dtype: DType
    role: str = "act"
    sharding: Sharding = REPLICATED
    source: tuple[tuple[str, Any], ...] = ()  # params: where the weight comes from (sorted items)

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(self.shape)

    def src(self) -> dict[str, Any]:
        return dict(self.source)

    def __str__(self) -> str:
        dims = "x".join(map(str, self.shape)) or "scalar"
        sh = "" if self.sharding == REPLICATED else f" {self.sharding}"
        return f"%{self.name}: {self.dtype.name}[{dims}]{sh}"


def freeze_attrs(attrs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    def fr(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(fr(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, fr(x)) for k, x in v.items()))
        return v

    return tuple(sorted((k, fr(v)) for k, v in attrs.items()))
