"""Linear tasks: [RMSNorm ->] GEMM [-> + residual] of the linear_* kinds (and the LM head's GEMM).

Tiles (n tile, m tile, k split) as `tilert.kernels.linear_tiling` cuts them. Persistent: the fused
linear and register-GEMV bodies of tilert/kernels/linear_fused.py (fp8 or bf16 weights), or with
TILERT_LINEAR_BODY=gemv the streaming GEMV of tilert/kernels/gemv.py for the LINEAR_FP8 tasks
(`stream_program`: each task issues the next task's first chunks when its SM queue runs the node's
tasks back to back). Eager:
the standalone FP8/MXFP4 GEMMs where the shapes fit, bf16 tensor-core GEMMs, else the reference.
Plan VM: the tile's slice of the reference GEMM; split-K tiles add into an fp32 workspace (the GPU's
atomics) and store the running sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from tilert.ir.graph import Graph, Node
from tilert.ir.opset.fused import split_extras
from tilert.ir.registry import ref
from tilert.kernels import fp8_gemm, linear_tiling, mxfp4_gemm
from tilert.kernels import gemv as streaming
from tilert.kernels import linear_fused as lf
from tilert.kernels.common import cdiv
from tilert.ops.qtensor import QTensor
from tilert.runtime.eager.context import kernels_on, norm, rows_bf16
from tilert.runtime.kinds.registry import Coords, TaskKind, task_kind
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import PREFETCH_MAX_BYTES, Bindings, NodeProgram, early_loads, tl_dtype
from tilert.runtime.persistent.vm_rank import PlanVMError, VMRank

KINDS = ("linear_bf16", "linear_fp8", "linear_mxfp4")


# ---- persistent --------------------------------------------------------------------------------


def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """The linear (or the LM head's GEMM) as the fused linear body at the plan's tiling (LINEAR_FP8 with
    TILERT_LINEAR_BODY=gemv: the streaming GEMV where it takes the tiles, `stream_program`)."""
    x, w = g.values[n.inputs[0]], g.values[n.inputs[1]]
    M, K, N = x.shape[0], x.shape[-1], w.shape[0]
    wt = b.env[w.name]
    bm, bn, bk, split, gemv = linear_tiling.node_shape(n.op, M, N, K, sms)  # as the plan's tiling chose it
    if gemv and not (isinstance(wt, QTensor) and wt.fmt == "fp8"):
        raise PersistentError(f"{n.op} node bound to {type(wt).__name__} weights; its plan tiles expect fp8")
    if isinstance(wt, QTensor):
        if wt.fmt != "fp8":
            raise PersistentError(f"{n.op}: {wt.fmt} weights have no persistent linear body yet")
        w_dtype, scale_rows, wtensors = "float8_e4m3", 1 if wt.scales.shape[0] == N else 128, [wt.data, wt.scales]
    else:
        w_dtype, scale_rows, wtensors = "bfloat16", 128, [wt.to(torch.bfloat16).contiguous()]
    lm = n.op.startswith("lm_head_")
    out = g.values[n.outputs[0]]
    res = None if lm or not n.a.residual else g.values[n.inputs[-1]]
    eps = n.a.norm_eps
    spec = lf.LinearSpec(
        M, N, K, bm, bn, bk, split, w_dtype, scale_rows, eps,
        None if res is None else tl_dtype(b.activation(res)), tl_dtype(b.activation(out)), gemv=gemv,
    )  # fmt: skip
    if (why := linear_tiling.supports(M, N, K, (bm, bn, bk, split), eps is not None)) is not None:
        raise PersistentError(f"{n.op} {why}")
    ts: list[torch.Tensor] = [b.activation(x), *wtensors]
    if eps is not None:
        gamma_i = 3 if n.op == "lm_head_accept" else 2
        ts.append(b.env[g.values[n.inputs[gamma_i]].name].to(torch.bfloat16).contiguous())
    if res is not None:
        ts.append(b.activation(res))
    ts.append(b.activation(out))
    opcode = "LM_HEAD_GEMM" if lm else {"float8_e4m3": "LINEAR_FP8", "bfloat16": "LINEAR_BF16"}[w_dtype]
    stream = lf.gemv_config(spec) if opcode == "LINEAR_FP8" and lf.body_choice() == "gemv" else None
    if split > 1 and stream is None:
        ts += [b.ws((spec.mp, N), torch.float32), b.ws((spec.tiles,), torch.int32), b.epoch]
    w0, esz, kt = wtensors[0], wtensors[0].element_size(), K // split

    def prefetch(name: str, n_tile: int, m_tile: int, k_split: int) -> tuple[int, int, int, int] | None:
        r0 = n_tile * bn
        rows = min(bn, N - r0)
        if name != opcode or rows * kt * esz > PREFETCH_MAX_BYTES:  # e.g. an LM-head tile: DRAM-bound anyway
            return None
        return w0.data_ptr() + (r0 * K + k_split * kt) * esz, kt * esz, rows, K * esz

    if stream is not None:  # TILERT_LINEAR_BODY=gemv
        return stream_program(stream, ts, b, prefetch)
    early = early_loads("linear")
    return NodeProgram(("linear", opcode, spec, early), lf.views(spec), lambda: {opcode: lf.make_body(spec, early)}, ts,
                       (opcode,), prefetch=prefetch)  # fmt: skip


# The streaming body's task chain, in the device table's c1 (the m tile, always 0 for its <= 16 tokens):
# bit 0: the task before issued this one's first chunks; bit 1: this one issues the next's; bit 2: the
# scale buffer; bits 3-6: the ring slot of its first chunk; bits 7-20 / 21-30: the next task's n tile
# and k split.
CHAIN_TILES, CHAIN_SPLITS = 1 << 14, 1 << 10


def chain_word(cfg: streaming.Config, run: int, nxt: tuple[int, int] | None) -> int:
    """c1 of a task that follows `run` tasks of its node on its SM queue; nxt: the next one's (n tile,
    k split) when the queue runs it right after."""
    w = (1 if run else 0) | (run % 2) << 2 | ((run * cfg.items) % cfg.depth) << 3
    return w if nxt is None else w | 2 | nxt[0] << 7 | nxt[1] << 21


def stream_program(cfg: streaming.Config, ts: list[torch.Tensor], b: Bindings, prefetch: Any) -> NodeProgram:
    """A LINEAR_FP8 node as gemv.py's FP8 body in its prefetch form, x staged by each task after its
    wait (x_own): the fused program's tensors (x, w, scales [, gamma] [, residual], out) in streaming.views
    order, with split-K its own partials (never initialised) and arrival counters (zero; the tile's
    last task resets its counter) instead of the fused workspace."""
    x, w, s, *extra, out = ts
    gamma = extra.pop(0) if cfg.norm_eps is not None else None
    res = extra.pop(0) if cfg.res_dtype is not None else None
    tensors = [x, w, s, out]
    if cfg.split > 1:
        tensors += [b.ws((cfg.split, cfg.m, cfg.n), torch.float32), b.ws((cfg.n_tiles,), torch.int32)]
    tensors += [t for t in (gamma, res) if t is not None]
    assert cfg.depth <= 16 and cfg.n_tiles <= CHAIN_TILES and cfg.split <= CHAIN_SPLITS, cfg

    def bodies() -> dict[str, Any]:
        import tilelang.language as T

        body = streaming.make_body(cfg, import_prelude=False, prefetch=True, x_own=True)

        @T.macro
        def linear_stream(V, c0, c1, c2):  # (c1 >= 0; shifts and masks as // and %: TVM's interval
            # analysis of a % over a shifted value failed with "Cannot match type int32 vs handle")
            body(V, c0, c2, V, c1 // 128 % CHAIN_TILES, c1 // (1 << 21), c1 // 2 % 2 == 1,
                 c1 % 2 == 0, c1 // 4 % 2, c1 // 8 % 16)  # fmt: skip

        return {"LINEAR_FP8": linear_stream}

    def chain(name: str, c: tuple[int, int, int], run: int, nxt: tuple[int, int, int] | None) -> tuple[int, int, int]:
        return c[0], chain_word(cfg, run, None if nxt is None else (nxt[0], nxt[2])), c[2]

    return NodeProgram(("linear_stream", cfg), streaming.views(cfg), bodies, tensors, ("LINEAR_FP8",),
                       prefetch=prefetch, prelude=streaming.LINEAR_PRELUDE, chain=chain)  # fmt: skip


# ---- plan VM -------------------------------------------------------------------------------------


def gemm_tile(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    """GEMM tile c = (n tile, m tile, k split) of a linear or LM-head node."""
    x, out = ins[0], rk.env[n.outputs[0]]
    w = rk.weight(n.inputs[1])
    M, K, N = math.prod(x.shape[:-1]), x.shape[-1], w.shape[0]
    bm, bn, _, split, _ = linear_tiling.node_shape(n.op, M, N, K, rk.sms)
    nt, mt, s = c
    if not (nt * bn < N and mt * bm < M and s < split):
        raise PlanVMError(f"{n.op} tile {c} outside ({cdiv(N, bn)}, {cdiv(M, bm)}, {split})")
    rows, cols = slice(mt * bm, min(M, (mt + 1) * bm)), slice(nt * bn, min(N, (nt + 1) * bn))
    kc = K // split
    ks = slice(s * kc, (s + 1) * kc)
    ctx = rk.ctx()
    eps = n.a.norm_eps
    residual = not n.op.startswith("lm_head_") and n.a.residual
    norm_w, res = split_extras(tuple(ins[3 if n.op == "lm_head_accept" else 2 :]), eps, residual)
    xr = x.reshape(M, K)[rows]
    if norm_w is not None:
        xr = ref("rms_norm")(ctx, xr, norm_w, eps=eps)[0]  # the prologue needs whole rows
    y = ref("matmul")(ctx, xr[:, ks], w[cols, ks], out_dtype="bf16")[0]
    if res is not None and s == 0:
        y = ref("add")(ctx, res.reshape(M, N)[rows, cols], y)[0]
    o2 = out.view(M, N)
    if split == 1:
        o2[rows, cols] = y
        return
    acc = rk.workspace(i).setdefault("acc", torch.zeros(M, N))
    acc[rows, cols] += y
    o2[rows, cols] = acc[rows, cols]


# ---- eager -----------------------------------------------------------------------------------------


def linear(ctx, x, w, *extra, out_dtype, norm_eps, residual):
    norm_w, res = split_extras(extra, norm_eps, residual)
    fast = isinstance(w, QTensor) and (w.fmt == "mxfp4" or w.block == (128, 128))
    if not fast or x.shape[-1] % 32 or not x.is_cuda or not kernels_on(ctx):
        kind = "linear_mxfp4" if isinstance(w, QTensor) and w.fmt == "mxfp4" else "linear_fp8"
        return ref(kind)(ctx, x, w, *extra, out_dtype=out_dtype, norm_eps=norm_eps, residual=residual)

    h = rows_bf16(norm(ctx, x, norm_w, norm_eps))
    run = mxfp4_gemm.run if w.fmt == "mxfp4" else fp8_gemm.run
    y = run(h, w.data, w.scales).reshape(*x.shape[:-1], -1)
    return (y if res is None else res.float() + y,)


def _bf16_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 tensor-core GEMM with fp32 accumulation (the reference upcasts whole weights to fp32)."""
    return torch.matmul(x.to(torch.bfloat16), w.t()).float()


def matmul_bf16(ctx, x, w, *, out_dtype):
    if not (x.is_cuda and w.dtype == torch.bfloat16):
        return ref("matmul")(ctx, x, w, out_dtype=out_dtype)
    return (_bf16_gemm(x, w),)


def linear_bf16(ctx, x, w, *extra, out_dtype, norm_eps, residual):
    if not (x.is_cuda and w.dtype == torch.bfloat16):
        return ref("linear_bf16")(ctx, x, w, *extra, out_dtype=out_dtype, norm_eps=norm_eps, residual=residual)
    norm_w, res = split_extras(extra, norm_eps, residual)
    y = _bf16_gemm(norm(ctx, x, norm_w, norm_eps), w)
    return (y if res is None else res.float() + y,)


def kernel_builds(g: Graph, n: Node) -> dict[Any, Callable[[], Any]]:
    """The standalone FP8/MXFP4 GEMM the eager runtime launches for a linear node it takes."""
    x, w = (g.values[v] for v in n.inputs[:2])
    if n.op not in ("linear_fp8", "linear_mxfp4") or x.shape[-1] % 32:
        return {}
    mod = fp8_gemm if n.op == "linear_fp8" else mxfp4_gemm
    cfg = mod.pick_config(math.prod(x.shape[:-1]), w.shape[0], w.shape[1])
    return {(n.op, cfg): lambda: mod.compiled(cfg)}


@task_kind
class Linear(TaskKind):
    kinds = KINDS
    opcodes = ("LINEAR_BF16", "LINEAR_FP8", "LINEAR_MXFP4")
    eager = {"linear_fp8": linear, "linear_mxfp4": linear, "linear_bf16": linear_bf16, "matmul": matmul_bf16}
    program = program
    tile = gemm_tile
    kernel_builds = kernel_builds
