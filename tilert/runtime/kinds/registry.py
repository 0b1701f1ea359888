"""Task kinds: how every runtime runs one kind of tile task, registered by one decorator.

A module per kind (tilert/runtime/kinds/<kind>.py) holds everything a runtime needs for its node
kinds beside the compiler's tiling (passes/tile.py, which asks the kernels): the eager
implementations, the persistent node program (views, bodies per opcode, tensors, prefetch), the
plan VM's tile bodies and the kernels `compile --kernels` builds for the eager runtime. It
subclasses `TaskKind` and registers the class with `@task_kind`; the runtimes look kinds up by node
kind (persistent step, eager runtime) or by opcode (plan VM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tilert.ir.graph import Graph, Node
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import Bindings, NodeProgram
from tilert.runtime.persistent.vm_rank import PlanVMError, VMRank

EagerImpl = Callable[..., tuple]
Coords = tuple[int, int, int]


class TaskKind:
    """One kind of tile task. A subclass lists its node kinds and opcodes and overrides what its
    runtimes run; whatever it leaves out falls back as stated on each member."""

    kinds: tuple[str, ...] = ()  # node kinds whose tasks these are
    opcodes: tuple[str, ...] = ()  # the tasks' opcodes (tilert.abi.OPCODES), the plan VM's dispatch
    # eager runtime: node kind -> implementation with the reference's signature, the TileLang kernels
    # where they take the shapes; a kind without one runs its torch reference on the GPU
    eager: dict[str, EagerImpl] = {}

    @staticmethod
    def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
        """The node's persistent program; a kind without one cannot run in the persistent step."""
        raise PersistentError(f"no persistent body for op kind '{n.op}'")

    @staticmethod
    def kernel_builds(g: Graph, n: Node) -> dict[Any, Callable[[], Any]]:
        """The standalone kernels the eager runtime launches for n: config key -> a thunk building it."""
        return {}

    @staticmethod
    def tile(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> None:
        """Plan VM: run task (opcode, c) of node i (n, its input buffers ins) on rank rk."""
        raise PlanVMError(f"no tile body for opcode {opcode} (node {n.op})")

    @staticmethod
    def collective(n: Node, opcode: str) -> bool:
        """Plan VM: whether the task meets its peers (arrive, wait for every rank, complete)."""
        return False

    @staticmethod
    def arrive(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> Any:
        """Plan VM: a collective task's local part, published to its peers."""
        raise PlanVMError(f"opcode {opcode} is not a collective")

    @staticmethod
    def complete(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords, parts: list[Any]) -> None:
        """Plan VM: a collective task's result from every rank's part (rank order)."""
        raise PlanVMError(f"opcode {opcode} is not a collective")


_BY_KIND: dict[str, type[TaskKind]] = {}
_BY_OPCODE: dict[str, type[TaskKind]] = {}
_EAGER: dict[str, EagerImpl] = {}


def task_kind(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: register a TaskKind for its node kinds, opcodes and eager implementations."""
    tables = ((_BY_KIND, cls.kinds), (_BY_OPCODE, cls.opcodes), (_EAGER, tuple(cls.eager)))
    for table, keys in tables:  # check everything before registering anything
        taken = [k for k in keys if k in table]
        if taken:
            raise ValueError(f"{cls.__name__}: {taken[0]!r} is registered already")
    for table, keys in tables[:2]:
        table.update(dict.fromkeys(keys, cls))
    _EAGER.update(cls.eager)
    return cls


def for_node(kind: str) -> type[TaskKind]:
    """The task kind of node kind `kind` (the base TaskKind, which runs nothing, when none has it)."""
    return _BY_KIND.get(kind, TaskKind)


def for_opcode(opcode: str) -> type[TaskKind] | None:
    return _BY_OPCODE.get(opcode)


def eager_impl(kind: str) -> EagerImpl | None:
    return _EAGER.get(kind)


def registered() -> dict[str, type[TaskKind]]:
    """Node kind -> its task kind, for every registered node kind."""
    return dict(_BY_KIND)
