"""tile: every op -> stages of tile tasks (opcode, tile coordinates, bytes/flops per tile).

Tile shapes per op kind live in TILE_CONFIG and TILE_RULES below (one place to change them).
They follow the TileLang kernels in tilert/kernels/: the GEMMs' block_m/block_n/block_k/split_k
heuristic (fp8_gemm.plan, mxfp4_gemm), split-KV decode attention (AttnConfig: block_n 64 keys,
splits ~one wave, plus the new-key split) with a combine stage, and the fused MoE as router,
top-k, per-slot-group gate/up and down, and reduce stages.

A stage's tasks each belong to one output chunk (a counter): the tile's column block for GEMMs,
the kv head for attention, the slot group for MoE gate/up. Reads say which columns of which
input (or which chunks of an earlier stage of the same op) a task needs; `schedule` turns them
into counter waits. MoE expert tasks are slot groups: slot j of the routed (token, expert) list
compacted by the top-k task; group g runs slots g, g+G, ... so the static table stays small and
a task with no routed slot exits at once. Costs are expected values under uniform routing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tilert.ir.graph import Graph, Node, Value
from tilert.ir.opset.fused import MOE_CORE
from tilert.ir.opset.moe import expected_experts
from tilert.passes.cost_model import kv_read_bytes, op_cost

TILE_CONFIG: dict[str, dict[str, Any]] = {
    "gemm": {"block_m": (16, 64), "block_k": (128, 64, 32), "block_n": 128, "block_n_small": 64,
             "wide_n": 128 * 16, "wave": 1.2, "min_k_tiles": 2},
    "attention": {"block_n": 64, "wave_ctas": 128},
    "moe": {"router_rows": 4, "block_n": 128, "gate_up_split_k": 4, "slot_margin": 1},
    "collective": {"cols": 1024},
    "generic": {"cols": 2048},
}  # fmt: skip


@dataclass(frozen=True)
class Read:
    src: int  # >= 0: node input index (columns lo..hi, None = all); < 0: stage -src-1 of this op (chunks)
    lo: int | None = None
    hi: int | None = None


@dataclass
class Stage:
    opcode: str
    chunks: int
    chunk_cols: int  # output columns per chunk (0: reads of this stage wait on all chunks)
    coords: list[tuple[int, int, int]] = field(default_factory=list)
    chunk: list[int] = field(default_factory=list)
    nbytes: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    comm: list[float] = field(default_factory=list)
    reads: list[tuple[Read, ...]] = field(default_factory=list)
    collective: bool = False

    def add(self, coords: tuple[int, int, int], chunk: int, nbytes: float, flops: float = 0.0,
            reads: tuple[Read, ...] = (), comm: float = 0.0) -> None:  # fmt: skip
        self.coords.append(coords)
        self.chunk.append(chunk)
        self.nbytes.append(nbytes)
        self.flops.append(flops)
        self.comm.append(comm)
        self.reads.append(reads)

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class OpTiles:
    stages: list[Stage]
    out_stage: list[int]  # stage index that produces each node output


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_shape(M: int, N: int, K: int, sms: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_k, split_k) as the GEMM kernels pick them."""
    c = TILE_CONFIG["gemm"]
    bm = min(c["block_m"][1], max(c["block_m"][0], cdiv(M, 16) * 16))
    bk = next((b for b in c["block_k"] if K % b == 0), c["block_k"][-1])
    bn = c["block_n"] if N >= c["wide_n"] else c["block_n_small"]
    tiles, nk, split = cdiv(N, bn) * cdiv(M, bm), cdiv(K, bk), 1
    for s in range(2, nk + 1):
        if nk % s == 0 and nk // s >= c["min_k_tiles"] and tiles * s <= sms * c["wave"]:
            split = s
    return bm, bn, bk, split


def _gemm_stage(opcode: str, x: Value, w: Value, out: Value, sms: int, whole_x: bool, res: int | None) -> Stage:
    M, K, N = math.prod(x.shape[:-1]), x.shape[-1], w.shape[0]
    bm, bn, _, split = gemm_shape(M, N, K, sms)
    st = Stage(opcode, cdiv(N, bn), bn)
    kc = K // split
    x_row = x.nbytes / max(1, M)
    for n in range(cdiv(N, bn)):
        rows = min(bn, N - n * bn)
        for m in range(cdiv(M, bm)):
            mm = min(bm, M - m * bm)
            for s in range(split):
                reads = [Read(0) if whole_x or split == 1 else Read(0, s * kc, (s + 1) * kc)]
                if res is not None:
                    reads.append(Read(res, n * bn, n * bn + rows))
                wbytes = w.nbytes * rows / N / split
                nbytes = wbytes + x_row * mm / split + out.nbytes * rows * mm / N / M
                st.add((n, m, s), n, nbytes, 2.0 * mm * rows * kc, tuple(reads))
    return st


def tile_linear(g: Graph, n: Node, ctx: Any) -> OpTiles:
    x, w = g.values[n.inputs[0]], g.values[n.inputs[1]]
    res = len(n.inputs) - 1 if n.a.get("residual") else None
    st = _gemm_stage(n.op.upper(), x, w, g.values[n.outputs[0]], ctx.gpu.sms, n.a.get("norm_eps") is not None, res)
    return OpTiles([st], [0])


def tile_lm_head(g: Graph, n: Node, ctx: Any) -> OpTiles:
    x, w = g.values[n.inputs[0]], g.values[n.inputs[1]]
    gemm = _gemm_stage("LM_HEAD_GEMM", x, w, g.values[n.outputs[0]], ctx.gpu.sms, True, None)
    world = int(g.meta.get("world", 1))
    tail = Stage("LM_HEAD_ACCEPT" if n.op == "lm_head_accept" else "LM_HEAD_ARGMAX", 1, 0, collective=world > 1)
    T = x.shape[0]
    tail.add((0, 0, 0), 0, g.values[n.outputs[0]].nbytes, reads=(Read(-1),), comm=(world - 1) * 8 * T)
    return OpTiles([gemm, tail], [0, 1, 1][: len(n.outputs)])


def attention_tiling(T: int, Hkv: int, heads: int, window: int) -> tuple[int, int, int]:
    """(query rows per kv head, rows per CTA, KV splits) of an attention node: one place for both the
    tile pass and anything that replays its tasks (the plan VM)."""
    c = TILE_CONFIG["attention"]
    rows = T * heads // Hkv
    bm = 64 if rows <= 64 else 128
    splits = max(1, cdiv(window, c["block_n"])) if window else max(1, c["wave_ctas"] // (Hkv * cdiv(rows, bm)))
    return rows, bm, splits


def tile_attention(g: Graph, n: Node, ctx: Any) -> OpTiles:
    a = n.a
    q, kc, vc = (g.values[n.inputs[i]] for i in (0, 3, 4))
    T, Hkv, H, D, Dv = q.shape[0], kc.shape[0], a["heads"], a["head_dim"], a["v_head_dim"]
    group = H // Hkv
    rows, bm, splits = attention_tiling(T, Hkv, H, a.get("window") or 0)
    rb = cdiv(rows, bm)
    kv = kv_read_bytes(n, kc, vc, T, ctx.context) / Hkv
    flops = 2.0 * rows * (D + Dv) * kv / ((D + Dv) * 2)
    split = Stage("ATTN_SPLIT", Hkv, group * Dv)
    for h in range(Hkv):
        q_cols = Read(0, h * group * D, (h + 1) * group * D)
        reads = (q_cols, Read(1, h * D, (h + 1) * D), Read(2, h * Dv, (h + 1) * Dv))
        for r in range(rb):
            for s in range(splits + 1):  # split `splits` = the new keys (rope + cache write)
                new = s == splits
                nb = (T * (D + Dv) * 2 * 2) if new else kv / splits
                split.add((h, r, s), h, nb + q.nbytes / Hkv / rb, flops / splits / rb, reads)
    comb = Stage("ATTN_COMBINE", Hkv, group * Dv)  # one query row per task, as combine_body(h, r)
    for h in range(Hkv):
        for r in range(rows):
            comb.add((h, r, 0), h, (splits + 1) * (Dv + 1) * 4 + Dv * 2, reads=(Read(-1, h, h + 1),))
    return OpTiles([split, comb], [1, 0, 0])


def tile_moe(g: Graph, n: Node, ctx: Any) -> OpTiles:
    c, a = TILE_CONFIG["moe"], n.a
    x, gate, _, gu, dn = (g.values[i] for i in n.inputs[:MOE_CORE])
    T, H = x.shape
    E, n_local, k, world = gate.shape[0], a["n_local"], a["top_k"], int(a.get("world", 1))
    I2 = gu.shape[1]
    active = min(n_local, expected_experts(T, k, E) / world)  # expected routed local experts
    slots = min(T * k, n_local)
    G = max(1, min(slots, math.ceil(active) + c["slot_margin"]))
    per_group = active / G  # expected experts a slot group runs
    router = Stage("MOE_ROUTER", cdiv(E, c["router_rows"]), c["router_rows"])
    for r in range(router.chunks):
        rows = min(c["router_rows"], E - r * c["router_rows"])
        router.add((r, 0, 0), r, gate.nbytes * rows / E + x.nbytes, 2.0 * T * rows * H, (Read(0),))
    topk = Stage("MOE_TOPK", 1, 0)
    topk.add((0, 0, 0), 0, T * E * 8, reads=(Read(-1),))
    bn, sk = c["block_n"], c["gate_up_split_k"]
    kc = H // sk
    tok = T * k / max(1e-9, expected_experts(T, k, E))  # expected tokens per routed expert
    up = Stage("MOE_GATE_UP", G, 0)  # (slot group, n tile, k split): fp32 atomics, like split-K GEMMs
    for s in range(G):
        for j in range(cdiv(I2, bn)):
            for q in range(sk):
                up.add((s, j, q), s, per_group * (gu.nbytes / n_local * bn / I2 / sk + tok * kc * 2 + tok * bn * 4),
                       per_group * 2.0 * tok * bn * kc, (Read(-2), Read(0, q * kc, (q + 1) * kc)))  # fmt: skip
    res = len(n.inputs) - 1 if a.get("residual") else None
    down = Stage("MOE_DOWN", cdiv(H, bn), bn)
    for j in range(cdiv(H, bn)):
        for s in range(G):
            reads = (Read(-3, s, s + 1),) + ((Read(res, j * bn, (j + 1) * bn),) if res is not None and not
                                             a.get("reduce") else ())  # fmt: skip
            down.add((s, j, 0), j, per_group * (dn.nbytes / n_local * bn / H + tok * (I2 * 2 + bn * 4)),
                     per_group * 2.0 * tok * bn * I2 / 2, reads)  # fmt: skip
    stages = [router, topk, up, down]
    if a.get("reduce"):
        stages.append(_reduce_stage("MOE_REDUCE", g.values[n.outputs[0]], world, src=-4, chunk_cols=bn, res=res))
    return OpTiles(stages, [len(stages) - 1])


def _reduce_stage(opcode: str, out: Value, world: int, src: int, chunk_cols: int | None, res: int | None) -> Stage:
    cols = TILE_CONFIG["collective"]["cols"]
    W = out.shape[-1]
    st = Stage(opcode, cdiv(W, cols), cols, collective=True)
    per_col = out.nbytes / W
    for c in range(st.chunks):
        lo, hi = c * cols, min(W, (c + 1) * cols)
        rd = Read(src, lo // chunk_cols, cdiv(hi, chunk_cols)) if chunk_cols else Read(src, lo, hi)
        reads = (rd,) + ((Read(res, lo, hi),) if res is not None else ())
        nb = per_col * (hi - lo) * (world + 2)
        st.add((c, 0, 0), c, nb, comm=2 * (world - 1) * per_col * (hi - lo) / world, reads=reads)
    return st


def tile_collective(g: Graph, n: Node, ctx: Any) -> OpTiles:
    world = int(g.meta.get("world", 1))
    out = g.values[n.outputs[0]]
    if n.op == "all_gather":  # each task sends one block of local columns to every peer
        x = g.values[n.inputs[0]]
        cols = TILE_CONFIG["collective"]["cols"]
        W = x.shape[-1]
        st = Stage("ALL_GATHER", cdiv(W, cols), 0, collective=True)
        for c in range(st.chunks):
            part = x.nbytes * (min(W, (c + 1) * cols) - c * cols) / W
            reads = (Read(0, c * cols, (c + 1) * cols),)
            st.add((c, 0, 0), c, part * (1 + world), comm=(world - 1) * part, reads=reads)
        return OpTiles([st], [0])
    res = 1 if n.op == "all_reduce_residual" else None
    return OpTiles([_reduce_stage("ALL_REDUCE", out, world, src=0, chunk_cols=None, res=res)], [0])


def tile_generic(g: Graph, n: Node, ctx: Any) -> OpTiles:
    """One task per block of output columns; elementwise kinds read the same columns."""
    out = g.values[n.outputs[0]]
    W = out.shape[-1] if out.shape else 1
    cols = TILE_CONFIG["generic"]["cols"]
    st = Stage("OP_" + n.op.upper(), cdiv(W, cols), cols if len(n.outputs) == 1 else 0)
    cost = op_cost(g, n, ctx.context)
    ew = n.op in ("add", "scale") or (n.op == "silu_mul" and len(n.inputs) == 2)
    for c in range(st.chunks):
        lo, hi = c * cols, min(W, (c + 1) * cols)
        reads = tuple(Read(i, lo, hi) if ew else Read(i) for i in range(len(n.inputs)))
        st.add((c, 0, 0), c, cost.bytes / st.chunks, cost.flops / st.chunks, reads)
    return OpTiles([st], [0] * len(n.outputs))


TileRule = Callable[[Graph, Node, Any], OpTiles]
TILE_RULES: dict[str, TileRule] = {
    **{k: tile_linear for k in ("linear_bf16", "linear_fp8", "linear_mxfp4")},
    **{k: tile_lm_head for k in ("lm_head_argmax", "lm_head_accept")},
    "attention_block": tile_attention,
    **{f"fused_moe_{f}": tile_moe for f in ("bf16", "fp8", "mxfp4")},
    **{k: tile_collective for k in ("all_reduce", "all_reduce_residual", "all_gather")},
}


def tile_graph(g: Graph, ctx: Any) -> list[OpTiles]:
    return [TILE_RULES.get(n.op, tile_generic)(g, n, ctx) for n in g.nodes]


def tile(graph: Graph, ctx: Any) -> Graph:
    """Pass entry: ctx.results['tile'][rank] = one OpTiles per node (shared by identical ranks)."""
    key = ("tile", structure_key(graph))
    if key not in ctx.cache:
        ctx.cache[key] = tile_graph(graph, ctx)
    ctx.put("tile", graph, ctx.cache[key])
    return graph


def structure_key(g: Graph) -> tuple:
    """Equal for rank graphs that differ only in per-rank attrs and names (same tiles, same schedule)."""
    return (g.meta.get("model"), g.meta.get("kind"), g.meta.get("mode"), tuple(
        (n.op, tuple(g.values[x].shape for x in n.inputs)) for n in g.nodes))  # fmt: skip
