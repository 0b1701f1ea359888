"""Build every TileLang kernel a compiled graph's eager execution will launch (no GPU needed).

Each node's task kind says which standalone kernels its eager implementation launches
(`TaskKind.kernel_builds`: a node gets a kernel when its shapes fit one). Kernels land in the disk
cache (TILERT_KERNEL_CACHE), so a GPU run later loads them instead of compiling, and a broken kernel
configuration fails here, on a CPU machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tilert.ir.graph import Graph
from tilert.runtime.kinds import for_node


def kernel_builds(g: Graph) -> dict[Any, Callable[[], Any]]:
    """Distinct kernel configurations of the graph -> a thunk that builds each."""
    out: dict[Any, Callable[[], Any]] = {}
    for n in g.nodes:
        out.update(for_node(n.op).kernel_builds(g, n))
    return out


def precompile(graphs: list[Graph], log: Callable[[str], None] | None = None) -> int:
    """Build the kernels of all graphs (deduplicated); returns how many configurations."""
    builds: dict[Any, Callable[[], Any]] = {}
    for g in graphs:
        builds.update(kernel_builds(g))
    for i, (key, fn) in enumerate(builds.items(), 1):
        if log:
            log(f"[{i}/{len(builds)}] {key[0]} {key[1]}")
        fn()
    return len(builds)
