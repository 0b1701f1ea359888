"""Build every TileLang kernel a compiled graph's eager execution will launch (no GPU needed).

The selection mirrors gpu_ops: a node gets a kernel when its shapes fit one. Kernels land in the
disk cache (TILERT_KERNEL_CACHE), so a GPU run later loads them instead of compiling, and a
broken kernel configuration fails here, on a CPU machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tilert.ir.graph import Graph


def kernel_builds(g: Graph) -> dict[Any, Callable[[], Any]]:
    """Distinct kernel configurations of the graph -> a thunk that builds each."""
    from tilert.kernels import attention as attn
    from tilert.kernels import fp8_gemm, moe, mxfp4_gemm
    from tilert.runtime.eager.gpu_ops import attn_config, moe_config

    out: dict[Any, Callable[[], Any]] = {}
    for n in g.nodes:
        a, ins = n.a, [g.values[x] for x in n.inputs]
        if n.op in ("linear_fp8", "linear_mxfp4") and ins[0].shape[-1] % 32 == 0:
            mod = fp8_gemm if n.op == "linear_fp8" else mxfp4_gemm
            m = 1
            for d in ins[0].shape[:-1]:
                m *= d
            cfg = mod.eager_config(m, ins[1].shape[0], ins[1].shape[1])
            out[(n.op, cfg)] = lambda mod=mod, cfg=cfg: mod.compiled(cfg)
        elif n.op == "fused_moe_mxfp4":
            x, gate, _, gu, d = ins[:5]
            cfg = moe_config(x.shape[0], x.shape[1], d.shape[2], gate.shape[0], gu.shape[0], a)
            if cfg is not None:
                out[("moe", cfg)] = lambda cfg=cfg: moe.compiled(cfg)
        elif n.op == "attention_block":
            cfg = attn_config(a, ins[0].shape[0])
            if cfg is not None:
                out[("attn", cfg)] = lambda cfg=cfg: attn.compiled(cfg)
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
