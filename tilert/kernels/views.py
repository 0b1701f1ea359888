"""Tensors as pointer rows: how tile bodies get their operands in the persistent kernel.

A body is written against a tuple of tensor views with static shapes. The persistent kernel
keeps one int64 row of device addresses per graph node (the node table) and builds the views
with T.make_tensor at dispatch, so one kernel signature serves every node of every layer and no
weights are restacked. Standalone launchers use the same path with a one-row table, so a body
is tested exactly as the persistent kernel calls it.

    ViewSpec             (name, shape, TileLang dtype); "part.name" puts a view in a named part
    PERSISTENT_THREADS   threads of every persistent CTA; every body must work with this many
    make_views(Ptrs, row, specs)          inside a prim_func: the views of one table row (`Views`)
    grid_launcher(name, body, specs, grid, coords)   a prim_func running body over a grid
    pointer_row(tensors, specs)           host side: check shapes/dtypes, int64 tensor of addresses
"""

# no `from __future__ import annotations`: TileLang evaluates the prim_func's annotations
from collections.abc import Callable, Sequence
from typing import Any

import torch

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

ViewSpec = tuple[str, tuple[int, ...], str]
PERSISTENT_THREADS = 256

TORCH_DTYPES = {
    "bfloat16": "bfloat16",
    "float32": "float32",
    "float8_e4m3": "float8_e4m3fn",
    "int32": "int32",
    "uint8": "uint8",
    "int64": "int64",
}


class Views:
    """A body's operand views in spec order, also by name: `V.count` is the view its spec names
    "count"; `V.part("peer")` is the Views of the specs named "peer.<name>" (a body composed of
    another body hands it its part); a slice is the Views of those positions."""

    __slots__ = ("_names", "_views")

    def __init__(self, views: Sequence[Any], names: Sequence[str]) -> None:
        self._views, self._names = tuple(views), tuple(names)

    def __len__(self) -> int:
        return len(self._views)

    def __iter__(self) -> Any:
        return iter(self._views)

    def __getitem__(self, i: int | slice) -> Any:
        return Views(self._views[i], self._names[i]) if isinstance(i, slice) else self._views[i]

    def __getattr__(self, name: str) -> Any:
        hits = [v for n, v in zip(self._names, self._views) if n == name]
        if len(hits) != 1:
            raise AttributeError(f"{len(hits)} views named {name!r} among {list(self._names)}")
        return hits[0]

    def part(self, prefix: str) -> "Views":
        at = [i for i, n in enumerate(self._names) if n.startswith(prefix + ".")]
        return Views([self._views[i] for i in at], [self._names[i][len(prefix) + 1 :] for i in at])


def make_views(Ptrs: Any, row: Any, specs: Sequence[ViewSpec]) -> Views:
    """Typed views of the addresses Ptrs[row, 0..] (call inside a T.prim_func / T.macro); row None:
    Ptrs is one row of addresses as int64 (the persistent loop's copy in shared memory)."""
    import tilelang.language as T

    def addr(j: int) -> Any:
        return Ptrs[row, j] if row is not None else T.reinterpret(Ptrs[j], "handle")

    views = [T.make_tensor(addr(j), tuple(shape), dtype) for j, (_, shape, dtype) in enumerate(specs)]
    return Views(views, [name for name, _, _ in specs])


def prefixed(prefix: str, specs: Sequence[ViewSpec]) -> list[ViewSpec]:
    """specs as the part `prefix` of a larger body's views (`Views.part`)."""
    return [(f"{prefix}.{name}", shape, dtype) for name, shape, dtype in specs]


def grid_launcher(
    name: str,
    body: Any,
    specs: Sequence[ViewSpec],
    grid: tuple[int, ...],
    coords: Callable[[Any, Any, Any], tuple],
    threads: int = PERSISTENT_THREADS,
) -> Any:
    """prim_func `name(Ptrs int64[1, len(specs)])` running body(views, *coords(bx, by, bz)) per CTA."""
    import tilelang.language as T

    g = tuple(grid) + (1,) * (3 - len(grid))
    n = len(specs)

    @T.prim_func
    def launcher(Ptrs: T.Tensor((1, n), T.ptr)):
        with T.Kernel(g[0], g[1], g[2], threads=threads) as (bx, by, bz):
            body(make_views(Ptrs, 0, specs), *coords(bx, by, bz))

    return launcher.with_attr("global_symbol", name)


def pointer_row(tensors: Sequence[Any], specs: Sequence[ViewSpec], where: str = "") -> Any:
    """int64 CPU tensor [1, n] of the tensors' addresses after checking each against its spec."""
    if len(tensors) != len(specs):
        raise ValueError(f"{where}: {len(tensors)} tensors for {len(specs)} views")
    for t, (name, shape, dtype) in zip(tensors, specs):
        want = getattr(torch, TORCH_DTYPES[dtype])
        if t.dtype != want:
            raise TypeError(f"{where}: {name} is {t.dtype}, the body reads {want}")
        if t.numel() < _numel(shape) or not t.is_contiguous():
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)} (contiguous: {t.is_contiguous()}), "
                             f"the body reads {tuple(shape)}")  # fmt: skip
    return torch.tensor([[t.data_ptr() for t in tensors]], dtype=torch.int64)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
