"""Op registry: each op kind declares shape/dtype inference, a torch reference and its cost.

Register with the `op` decorator on the reference function:

    @op("rms_norm", infer=same_as(0), cost=elementwise_cost)
    def rms_norm(ctx, x, w, *, eps): ...

References receive runtime objects (torch tensors; quantised weights as `QTensor`) and the
node's attrs as keyword arguments, and return a tuple of outputs. Kinds that update state in
place (KV caches) list the input positions in `mutates` and return those inputs as outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tilert.ir.dtypes import DType
from tilert.ir.value import IRError, Value

Shape = tuple[int, ...]
InferFn = Callable[[list[Value], dict[str, Any]], list[tuple[Shape, DType]]]


@dataclass(frozen=True)
class Cost:
    """DRAM bytes and flops of one execution; the cost model turns these into time."""

    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0
    comm_bytes: int = 0  # bytes each rank sends over the interconnect

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def __add__(self, o: Cost) -> Cost:
        return Cost(
            self.bytes_read + o.bytes_read,
            self.bytes_written + o.bytes_written,
            self.flops + o.flops,
            self.comm_bytes + o.comm_bytes,
        )


CostFn = Callable[[list[Value], list[Value], dict[str, Any]], Cost]


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn
    reference: Callable[..., Sequence[Any]]
    cost: CostFn
    mutates: tuple[int, ...] = ()
    collective: bool = False
    doc: str = ""


_REGISTRY: dict[str, OpDef] = {}


def op(
    name: str, *, infer: InferFn, cost: CostFn | None = None, mutates: tuple[int, ...] = (), collective: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"op kind '{name}' registered twice")
        _REGISTRY[name] = OpDef(name, infer, fn, cost or io_cost, mutates, collective, (fn.__doc__ or "").strip())
        return fn

    return deco


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown op kind '{name}'") from None


def all_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


# ---- helpers for op definitions --------------------------------------------------------------


def io_cost(ins: list[Value], outs: list[Value], attrs: dict[str, Any]) -> Cost:
    """Every input read once, every output written once, no flops."""
    return Cost(sum(v.nbytes for v in ins), sum(v.nbytes for v in outs))


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise IRError(msg)


def same_as(i: int) -> InferFn:
    return lambda ins, a: [(ins[i].shape, ins[i].dtype)]
