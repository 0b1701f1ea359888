"""Graph rewriting helpers shared by the passes: match queries and one-sweep node replacement.

Passes collect every replacement first and apply them in one O(nodes) sweep (`Rewriter.finish`),
so a pass over a 16k-node sharded graph stays linear. Replaced nodes must not overlap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from tilert.ir.graph import Graph, IRError, Node, Value, freeze_attrs


class Rewriter:
    """Read-only views of one graph plus a list of pending replacements."""

    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.prod = graph.producers()
        self.cons = graph.consumers()
        self.outputs = set(graph.outputs)
        self._taken: set[int] = set()
        self._at: dict[int, list[Node]] = {}
        self._new_values: list[Value] = []

    # ---- queries ----------------------------------------------------------------------------
    def producer(self, value: str, op: str | Iterable[str] | None = None) -> tuple[int, Node] | None:
        """(index, node) producing `value`, if any (and of kind `op` when given)."""
        i = self.prod.get(value)
        if i is None:
            return None
        n = self.g.nodes[i]
        if op is not None and n.op != op and (isinstance(op, str) or n.op not in op):
            return None
        return i, n

    def users(self, value: str) -> list[int]:
        return self.cons.get(value, [])

    def sole_user(self, value: str) -> int | None:
        """The one node reading `value` when it is also not a graph output; else None."""
        u = self.users(value)
        return u[0] if len(u) == 1 and value not in self.outputs else None

    def private(self, value: str, allowed: set[int]) -> bool:
        """True when only nodes in `allowed` read `value` and it is not a graph output."""
        return value not in self.outputs and all(i in allowed for i in self.users(value))

    def value(self, name: str) -> Value:
        return self.g.values[name]

    # ---- edits ------------------------------------------------------------------------------
    def replace(self, remove: Iterable[int], *nodes: Node, values: Iterable[Value] = (), first: bool = False) -> bool:
        """Replace the nodes `remove` by `nodes`, placed where the last (or `first`) removed node was.

        Returns False (and changes nothing) when a node is already part of another replacement.
        """
        remove = set(remove)
        if remove & self._taken:
            return False
        self._taken |= remove
        self._at.setdefault(min(remove) if first else max(remove), []).extend(nodes)
        self._new_values.extend(values)
        return True

    def taken(self, i: int) -> bool:
        return i in self._taken

    @property
    def changed(self) -> bool:
        return bool(self._taken)

    def finish(self) -> Graph:
        """The rewritten graph (unused activations dropped), verified."""
        if not self._taken:
            return self.g
        out = self.g.copy()
        for v in self._new_values:
            out.values[v.name] = v
        nodes: list[Node] = []
        for i, n in enumerate(self.g.nodes):
            if i not in self._taken:
                nodes.append(n)
            nodes.extend(self._at.get(i, []))
        out.nodes = nodes
        used = {x for n in nodes for x in (*n.inputs, *n.outputs)} | set(out.outputs)
        out.values = {k: v for k, v in out.values.items() if v.role != "act" or k in used}
        return out.verify()


def make_node(op: str, inputs: Iterable[str], outputs: Iterable[str], **attrs: Any) -> Node:
    return Node(op, tuple(inputs), tuple(outputs), freeze_attrs({k: v for k, v in attrs.items() if v is not None}))


def retype(v: Value, **kw: Any) -> Value:
    return replace(v, **kw)


def weight_of(rw: Rewriter, w: str) -> tuple[str, int | None]:
    """The param behind a GEMM weight input (through a dequant) and the dequant's node index."""
    p = rw.producer(w, "dequant")
    return (p[1].inputs[0], p[0]) if p else (w, None)


def fail(msg: str) -> None:
    raise IRError(msg)
