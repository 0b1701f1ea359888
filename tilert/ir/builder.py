"""A small helper for writing graphs: values get unique names, outputs are inferred."""

from __future__ import annotations

from typing import Any

from tilert.ir.dtypes import DType
from tilert.ir.graph import Graph, Node, Value, freeze_attrs, unique_name
from tilert.ir.registry import get_op


class GraphBuilder:
    def __init__(self, name: str, meta: dict[str, Any] | None = None) -> None:
        self.g = Graph(name, meta=dict(meta or {}))

    def input(self, name: str, shape: tuple[int, ...], dtype: DType) -> str:
        return self.g.add_value(Value(name, tuple(shape), dtype, "input")).name

    def state(self, name: str, shape: tuple[int, ...], dtype: DType) -> str:
        return self.g.add_value(Value(name, tuple(shape), dtype, "state")).name

    def param(self, name: str, shape: tuple[int, ...], dtype: DType, **source: Any) -> str:
        return self.g.add_value(Value(name, tuple(shape), dtype, "param", source=freeze_attrs(source))).name

    def op(self, kind: str, *inputs: str, name: str | None = None, n_out: int | None = None, **attrs: Any) -> Any:
        """Append a node; returns its output name (or a tuple of names for multi-output kinds)."""
        opdef = get_op(kind)
        ins = [self.g.values[x] for x in inputs]
        inferred = opdef.infer(ins, opdef.attrs.parse(attrs))
        outs = []
        for i, (shape, dt) in enumerate(inferred):
            base = name or kind
            base = base if len(inferred) == 1 else f"{base}.{i}"
            nm = unique_name(self.g.values, base)
            outs.append(self.g.add_value(Value(nm, tuple(shape), dt)).name)
        self.g.nodes.append(Node(kind, tuple(inputs), tuple(outs), freeze_attrs(attrs)))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def output(self, *names: str) -> None:
        self.g.outputs.extend(names)

    def finish(self) -> Graph:
        return self.g.verify()
