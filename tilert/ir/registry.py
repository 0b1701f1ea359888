"""Op registry: each op kind declares its attributes, shape/dtype inference, a torch reference and
its cost.

Register with the `op` decorator on the reference function:

    @attrs
    class NormAttrs(Attrs):
        eps: float

    @op("rms_norm", attrs=NormAttrs, infer=same_as(0), cost=elementwise_cost)
    def rms_norm(ctx, x, w, *, eps): ...

Inference gets the node's typed attributes (`Node.a`), a cost function also the `Placement` it
is costed at (the plan's world size and KV context). References receive runtime objects (torch
tensors; quantised weights as `QTensor`) and every attribute as a keyword argument (their defaults
are the attributes class's, so a reference restates none), and return a tuple of outputs. Kinds
that update state in place (KV caches) list the input positions in `mutates` and return those
inputs as outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tilert.ir.attrs import Attrs
from tilert.ir.dtypes import DType
from tilert.ir.value import IRError, Value

Shape = tuple[int, ...]
InferFn = Callable[[list[Value], Any], list[tuple[Shape, DType]]]


@dataclass(frozen=True)
class Placement:
    """What a cost depends on beside the node: the plan's world size and the KV length it plans for."""

    world: int = 1
    context: int = 4096


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


CostFn = Callable[[list[Value], list[Value], Any, Placement], Cost]


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn
    reference: Callable[..., Sequence[Any]]
    cost: CostFn
    attrs: type[Attrs] = Attrs
    mutates: tuple[int, ...] = ()
    collective: bool = False
    doc: str = ""


_REGISTRY: dict[str, OpDef] = {}


def op(
    name: str, *, infer: InferFn, attrs: type[Attrs] = Attrs, cost: CostFn | None = None, mutates: tuple[int, ...] = (),
    collective: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"op kind '{name}' registered twice")
        doc = (fn.__doc__ or "").strip()
        _REGISTRY[name] = OpDef(name, infer, fn, cost or io_cost, attrs, mutates, collective, doc)
        return fn

    return deco


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise IRError(f"unknown op kind '{name}'") from None


def ref(name: str) -> Callable[..., Sequence[Any]]:
    """The torch reference of op kind `name` (fused references and runtimes compose them)."""
    return get_op(name).reference


def all_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


# ---- helpers for op definitions --------------------------------------------------------------


def io_cost(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    """Every input read once, every output written once, no flops."""
    return Cost(sum(v.nbytes for v in ins), sum(v.nbytes for v in outs))


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise IRError(msg)


def same_as(i: int) -> InferFn:
    return lambda ins, a: [(ins[i].shape, ins[i].dtype)]
