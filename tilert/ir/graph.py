"""The graph IR: immutable values and nodes in a topologically ordered list.

A graph is the decode step of one rank: inputs (tokens, positions, ...), params (weights), state
(KV caches, updated in place by ops that declare it) and the nodes between them. Passes build new
graphs; the verifier runs after each one. Text and JSON forms are both stable; JSON round-trips
exactly (`Graph.from_json(g.to_json()) == g`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from tilert.ir.attrs import Attrs
from tilert.ir.dtypes import dtype
from tilert.ir.registry import get_op
from tilert.ir.value import REPLICATED, IRError, Sharding, Value, freeze_attrs

ROLES = ("input", "param", "state", "act")
__all__ = ["REPLICATED", "ROLES", "Graph", "IRError", "Node", "Sharding", "Value", "freeze_attrs", "unique_name"]


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()  # as set: sorted (key, value); values are JSON scalars/tuples

    @functools.cached_property
    def a(self) -> Attrs:
        """The attributes, typed: the kind's Attrs class with its defaults filled in."""
        return get_op(self.op).attrs.parse(self.attrs)

    def with_attrs(self, **kw: Any) -> Node:
        return replace(self, attrs=freeze_attrs({**dict(self.attrs), **kw}))


def _thaw(v: Any) -> Any:
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


@dataclass
class Graph:
    name: str
    values: dict[str, Value] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    def add_value(self, v: Value) -> Value:
        if v.name in self.values:
            raise IRError(f"value '%{v.name}' defined twice")
        self.values[v.name] = v
        return v

    def copy(self, name: str | None = None) -> Graph:
        return Graph(
            name or self.name,
            dict(self.values),
            list(self.nodes),
            list(self.outputs),
            json.loads(json.dumps(self.meta)),
        )

    # ---- queries ------------------------------------------------------------------------
    def by_role(self, role: str) -> list[Value]:
        return [v for v in self.values.values() if v.role == role]

    def producers(self) -> dict[str, int]:
        return {o: i for i, n in enumerate(self.nodes) for o in n.outputs}

    def consumers(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for x in n.inputs:
                out.setdefault(x, []).append(i)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def to_networkx(self):  # noqa: ANN201 - networkx is an optional import at call time

        g = nx.DiGraph()
        prod = self.producers()
        for i, n in enumerate(self.nodes):
            g.add_node(i, op=n.op)
            for x in n.inputs:
                if x in prod:
                    g.add_edge(prod[x], i, value=x)
        return g

    # ---- verification -------------------------------------------------------------------
    def verify(self) -> Graph:
        """Check the graph is well formed; raises IRError naming the problem. Returns self."""
        defined = {v.name for v in self.values.values() if v.role != "act"}
        consumed_state: dict[str, int] = {}
        for v in self.values.values():
            if v.role not in ROLES:
                raise IRError(f"value '%{v.name}' has unknown role '{v.role}'")
        for i, n in enumerate(self.nodes):
            where = f"node {i} ({n.op})"
            opdef = get_op(n.op)
            try:
                a = n.a
            except IRError as e:
                raise IRError(f"{where}: {e}") from None
            for x in n.inputs:
                if x not in self.values:
                    raise IRError(f"{where}: input '%{x}' is not a value of the graph")
                if x not in defined:
                    raise IRError(f"{where}: input '%{x}' is used before it is defined (cycle or bad order)")
            for o in n.outputs:
                if o not in self.values:
                    raise IRError(f"{where}: output '%{o}' is not a value of the graph")
                if o in defined:
                    raise IRError(f"{where}: output '%{o}' is defined twice")
                if self.values[o].role != "act":
                    raise IRError(f"{where}: output '%{o}' must be an activation, not {self.values[o].role}")
            for j in opdef.mutates:  # in-place state updates: each state version is written once
                x = n.inputs[j]
                if x in consumed_state:
                    raise IRError(f"{where}: state '%{x}' was already updated by node {consumed_state[x]}")
                consumed_state[x] = i
            ins = [self.values[x] for x in n.inputs]
            try:
                expect = opdef.infer(ins, a)
            except IRError as e:
                raise IRError(f"{where}: {e}") from None
            if len(expect) != len(n.outputs):
                raise IRError(f"{where}: produces {len(n.outputs)} outputs, op defines {len(expect)}")
            for o, (shape, dt) in zip(n.outputs, expect):
                v = self.values[o]
                if tuple(v.shape) != tuple(shape) or v.dtype != dt:
                    raise IRError(
                        f"{where}: output '%{o}' is {v.dtype.name}{list(v.shape)} "
                        f"but {n.op} infers {dt.name}{list(shape)}"
                    )
            defined.update(n.outputs)
        for o in self.outputs:
            if o not in defined:
                raise IRError(f"graph output '%{o}' is never defined")
        return self

    # ---- text form ----------------------------------------------------------------------
    def to_text(self) -> str:
        lines = [f"graph {self.name} {{"]
        for role in ("input", "state", "param"):
            for v in self.by_role(role):
                lines.append(f"  {role} {v}")
        for n in self.nodes:
            outs = ", ".join(str(self.values[o]) for o in n.outputs)
            ins = ", ".join(f"%{x}" for x in n.inputs)
            at = ", ".join(f"{k}={_fmt(v)}" for k, v in n.attrs)
            lines.append(f"  {outs} = {n.op}({ins}){' {' + at + '}' if at else ''}")
        lines.append(f"  return {', '.join('%' + o for o in self.outputs)}")
        lines.append("}")
        return "\n".join(lines) + "\n"

    __str__ = to_text

    # ---- JSON form ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "tilert.graph/1",
            "name": self.name,
            "values": [
                {
                    "name": v.name,
                    "shape": list(v.shape),
                    "dtype": v.dtype.name,
                    "role": v.role,
                    "sharding": str(v.sharding),
                    "source": {k: _thaw(x) for k, x in v.source},
                }
                for v in self.values.values()
            ],
            "nodes": [
                {
                    "op": n.op,
                    "inputs": list(n.inputs),
                    "outputs": list(n.outputs),
                    "attrs": {k: _thaw(x) for k, x in n.attrs},
                }
                for n in self.nodes
            ],
            "outputs": list(self.outputs),
            "meta": self.meta,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Graph:
        if d.get("format") != "tilert.graph/1":
            raise IRError(f"not a tilert graph (format {d.get('format')!r})")
        g = Graph(d["name"], meta=d.get("meta", {}), outputs=list(d["outputs"]))
        for v in d["values"]:
            g.add_value(
                Value(
                    v["name"],
                    tuple(v["shape"]),
                    dtype(v["dtype"]),
                    v["role"],
                    Sharding.parse(v["sharding"]),
                    freeze_attrs(v.get("source", {})),
                )
            )
        g.nodes = [Node(n["op"], tuple(n["inputs"]), tuple(n["outputs"]), freeze_attrs(n["attrs"])) for n in d["nodes"]]
        return g

    @staticmethod
    def from_json(s: str) -> Graph:
        return Graph.from_dict(json.loads(s))


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def unique_name(existing: Iterable[str], base: str) -> str:
    names = set(existing)
    if base not in names:
        return base
    i = 1
    while f"{base}.{i}" in names:
        i += 1
    return f"{base}.{i}"
