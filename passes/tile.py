"""tile: every op -> stages of tile tasks (opcode, tile coordinates, bytes/flops per tile).

TILE_RULES below maps op kinds to their rules. Tile shapes and coordinates are the kernels' own
(each kernel family owns its tiling), so a persistent kernel can run their tile bodies straight
from a task row: the GEMMs' (n tile, m tile, k split) of `tilert.kernels.linear_tiling`, split-KV
decode attention (rows, block_m and splits of `tilert.kernels.attention.tiling`) with a combine
stage, the fused MoE's router / route / gate_up / down bodies grouped by
`tilert.kernels.moe.tiling` plus a reduce stage, and the column blocks of the collective and
generic bodies (`tilert.kernels.elementwise`).

A stage's tasks each belong to one output chunk (a counter): the tile's column block for GEMMs,
the kv head for attention, one for each MoE stage. Reads say which columns of which input (or
which chunks of an earlier stage of the same op) a task needs; `schedule` turns them into
counter waits. MoE expert tasks stride over the items of the device-side active-expert list the
top-k task compacts (moe.MoeTiling: only slots < Count have items), so their number does not
depend on routing. Costs are expected values under uniform routing (`slot_busy`), or for
`ctx.routed_experts` local experts per layer where the caller knows them (a measured routing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tilert.ir.graph import Graph, Node, Value
from tilert.ir.opset.fused import MOE_CORE
from tilert.ir.opset.moe import expected_experts
from tilert.kernels import attention, linear_tiling, moe
from tilert.kernels.common import cdiv
from tilert.kernels.elementwise import COLLECTIVE_COLS, GENERIC_COLS
from tilert.passes.cost_model import kv_read_bytes, op_cost


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
    nbytes: list[float] = field(default_factory=list)  # reads + writes
    stream: list[float] = field(default_factory=list)  # of nbytes: weights and KV cache (HBM; the rest mostly L2)
    flops: list[float] = field(default_factory=list)
    comm: list[float] = field(default_factory=list)
    reads: list[tuple[Read, ...]] = field(default_factory=list)
    collective: bool = False
    # work the stage's last-finishing task runs after its own tile (opcode, bytes, flops): the top-k in
    # the router's last-arriving task (kernels/moe.py topk_place); its readers see it done
    tail: tuple[str, float, float] | None = None

    def add(self, coords: tuple[int, int, int], chunk: int, nbytes: float, flops: float = 0.0,
            reads: tuple[Read, ...] = (), comm: float = 0.0, stream: float = 0.0) -> None:  # fmt: skip
        self.coords.append(coords)
        self.chunk.append(chunk)
        self.nbytes.append(nbytes)
        self.stream.append(stream)
        self.flops.append(flops)
        self.comm.append(comm)
        self.reads.append(reads)

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class OpTiles:
    stages: list[Stage]
    out_stage: list[int]  # stage index that produces each node output


def _gemm_stage(opcode: str, x: Value, w: Value, out: Value, sms: int, whole_x: bool, res: int | None,
                op: str = "") -> Stage:  # fmt: skip
    M, K, N = math.prod(x.shape[:-1]), x.shape[-1], w.shape[0]
    bm, bn, _, split, _ = linear_tiling.node_shape(op, M, N, K, sms)
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
                st.add((n, m, s), n, nbytes, 2.0 * mm * rows * kc, tuple(reads), stream=wbytes)
    return st


def tile_linear(g: Graph, n: Node, ctx: Any) -> OpTiles:
    x, w = g.values[n.inputs[0]], g.values[n.inputs[1]]
    res = len(n.inputs) - 1 if n.a.residual else None
    st = _gemm_stage(n.op.upper(), x, w, g.values[n.outputs[0]], ctx.gpu.sms, n.a.norm_eps is not None, res,
                     n.op)  # fmt: skip
    return OpTiles([st], [0])


def tile_lm_head(g: Graph, n: Node, ctx: Any) -> OpTiles:
    x, w = g.values[n.inputs[0]], g.values[n.inputs[1]]
    gemm = _gemm_stage("LM_HEAD_GEMM", x, w, g.values[n.outputs[0]], ctx.gpu.sms, True, None)
    world = int(g.meta.get("world", 1))
    tail = Stage("LM_HEAD_ACCEPT" if n.op == "lm_head_accept" else "LM_HEAD_ARGMAX", 1, 0, collective=world > 1)
    T = x.shape[0]
    tail.add((0, 0, 0), 0, g.values[n.outputs[0]].nbytes, reads=(Read(-1),), comm=(world - 1) * 8 * T)
    return OpTiles([gemm, tail], [0, 1, 1][: len(n.outputs)])


def tile_attention(g: Graph, n: Node, ctx: Any) -> OpTiles:
    a = n.a
    q, kc, vc = (g.values[n.inputs[i]] for i in (0, 3, 4))
    T, Hkv, H, D, Dv = q.shape[0], kc.shape[-3], a.heads, a.head_dim, a.v_head_dim
    group = H // Hkv
    rows, bm, splits = attention.tiling(a, T, Hkv)
    rb = attention.row_blocks(a, T, Hkv)
    if a.slotted:  # a mixed step: each row block (token) reads its own sequence's keys, one slot's cache
        kv = kv_read_bytes(n, kc, vc, 1, ctx.context) / Hkv
    else:
        kv = kv_read_bytes(n, kc, vc, T, ctx.context) / Hkv
    flops = 2.0 * rows * (D + Dv) * kv / ((D + Dv) * 2)
    split = Stage("ATTN_SPLIT", Hkv, group * Dv)
    for h in range(Hkv):
        q_cols = Read(0, h * group * D, (h + 1) * group * D)
        # the caches too: a drafter step appends its context rows (a kv_append node) before the block
        # attends over them; a target step's caches are states, which no task of the step produces
        reads = (q_cols, Read(1, h * D, (h + 1) * D), Read(2, h * Dv, (h + 1) * Dv), Read(3), Read(4))
        for r in range(rb):
            for s in range(splits + 1):  # split `splits` = the new keys (rope + cache write)
                new = s == splits
                nb = (T * (D + Dv) * 2 * 2) if new else kv / splits
                split.add((h, r, s), h, nb + q.nbytes / Hkv / rb, flops / splits / rb, reads, stream=0 if new else nb)
    comb = Stage("ATTN_COMBINE", Hkv, group * Dv)  # one query row per task, as combine_body(h, r)
    for h in range(Hkv):
        for r in range(rows):
            comb.add((h, r, 0), h, (splits + 1) * (Dv + 1) * 4 + Dv * 2, reads=(Read(-1, h, h + 1),))
    return OpTiles([split, comb], [1, 0, 0])


def slot_busy(T: int, k: int, E: int, n_local: int, slots: int) -> list[float]:
    """P(Count > s) for s < slots: the chance MoE slot s has an expert, with Count ~ Binomial(n_local,
    q) routed local experts (q = P(an expert gets >= 1 of T tokens), uniform routing). The expected-
    value cost of a slot's tasks is this times a routed slot's cost; the sum is the expected active
    local experts, so weight bytes count only for experts expected to be routed to."""
    q = expected_experts(T, k, E) / E
    if q >= 1.0:
        return [1.0] * slots
    n, lq, lp = n_local, math.log(q), math.log1p(-q)
    tail, out = 1.0, []
    for s in range(slots):  # log-space pmf: no overflow for large n_local
        tail -= math.exp(math.lgamma(n + 1) - math.lgamma(s + 1) - math.lgamma(n - s + 1) + s * lq + (n - s) * lp)
        out.append(max(0.0, tail))
    return out


MOE_STAGE_BYTES = 96 * 1024  # = runtime/kinds/moe.py's: the most rows an MoE body stages in shared memory


def moe_expert_work(opcode: str, geo: moe.MoeTiling, expert_bytes: float, items: float, slots: float
                    ) -> tuple[float, float, float]:  # fmt: skip
    """(bytes, of them HBM-stream bytes, flops) of one MOE_GATE_UP or MOE_DOWN task that runs `items`
    items of `slots` distinct slots, `expert_bytes` the weights of one expert: its items' weights
    (streamed), the rows it reads (gate/up: x, staged in shared memory once per task; down: a slot's
    Hb rows, staged when the task's slot changes; per item where they do not fit the stage, which
    the GEMV body never does), its writes (Hb columns; Y, float32 atomics) and the MMA flops
    (runtime/kinds/moe.py's bodies; the item sizes are `geo`'s, the mainloop's or the GEMV's)."""
    T, H, In = geo.tokens, geo.hidden, geo.inter
    gemv = geo.gemv is not None
    if opcode == "MOE_GATE_UP":
        stream = expert_bytes * items / geo.gu_tiles
        x = T * H * 2 * (min(1.0, items) if gemv or T * H * 2 <= MOE_STAGE_BYTES else items)
        return stream + x + items * T * geo.gu_width * 2, stream, items * 4.0 * T * geo.gu_width * H
    kc = In / geo.down_split
    stream = expert_bytes * items / (geo.down_tiles * geo.down_split)
    h = T * In * 2 * slots if gemv or T * In * 2 <= MOE_STAGE_BYTES else T * kc * 2 * items
    return stream + h + items * T * geo.down_rows * 4, stream, items * 2.0 * T * geo.down_rows * kc


def tile_moe(g: Graph, n: Node, ctx: Any) -> OpTiles:
    """The fused MoE at the kernel's coordinates (tilert/kernels/moe.py bodies, grouped by
    `moe.tiling`): ROUTER (e_tile) [-> TOPK] -> GATE_UP (task) -> DOWN (task) -> REDUCE (column
    block), always (all-reduce only when reduce and world > 1); the top-k is a stage of its own
    only with TILERT_MOE_TOPK=task, else the last router task to arrive runs it (`Stage.tail`)."""
    a = n.a
    x, gate, _, gu, dn = (g.values[i] for i in n.inputs[:MOE_CORE])
    out = g.values[n.outputs[0]]
    T, H = x.shape
    E, n_local, k, world = gate.shape[0], a.n_local, a.top_k, a.world
    In = dn.shape[2]
    geo = moe.tiling(T, H, In, n_local, k)
    busy = slot_busy(T, k, E, n_local, geo.max_slots)
    zper = cdiv(T * H, cdiv(E, moe.ROUTER_E))  # Y elements each router task zeroes
    router = Stage("MOE_ROUTER", cdiv(E, moe.ROUTER_E), moe.ROUTER_E)
    for r in range(router.chunks):
        rows = min(moe.ROUTER_E, E - r * moe.ROUTER_E)
        router.add((r, 0, 0), r, gate.nbytes * rows / E + x.nbytes + T * rows * 4 + zper * 4, 2.0 * T * rows * H,
                   (Read(0),), stream=gate.nbytes * rows / E)  # fmt: skip
    topk_bytes = T * E * 8 + n_local * (moe.TP + 1) * 4
    stages = [router]
    if geo.topk_in_router:  # the last router task to arrive runs it (no stage, no hand-over)
        router.tail = ("MOE_TOPK", topk_bytes, 0.0)
    else:
        topk = Stage("MOE_TOPK", 1, 0)
        topk.add((0, 0, 0), 0, topk_bytes, reads=(Read(-1),))
        stages.append(topk)
    routed_at = Read(-len(stages))  # the top-k's outputs (List, Count, TokW), the router's (xh) before them
    # gate/up and down tasks stride over the active slots' items (moe.MoeTiling); costs are expected
    # values: `act` routed local experts' items spread over the stage's tasks
    routed = getattr(ctx, "routed_experts", None)
    act = sum(busy) if routed is None else min(float(routed), geo.max_slots)
    up = Stage("MOE_GATE_UP", 1, 0)  # one counter: the down tasks wait for every gate/up task
    items = act * geo.gu_tiles / geo.gu_tasks
    for j in range(geo.gu_tasks):
        nb, sb, fl = moe_expert_work("MOE_GATE_UP", geo, gu.nbytes / n_local, items, act)
        up.add((j, 0, 0), 0, nb, fl, (routed_at, Read(0)), stream=sb)
    stages.append(up)
    down = Stage("MOE_DOWN", 1, 0)  # one counter: REDUCE waits for every down task
    items = act * geo.down_tiles * geo.down_split / geo.down_tasks
    # distinct slots a task's items touch: strided items (mainloop body) one slot each; the GEMV
    # body's contiguous share spans items / tiles-per-slot slots, plus one where it crosses a slot
    slots = min(act, items) if geo.gemv is None else min(act, items, items / geo.down_tiles + 1)
    for j in range(geo.down_tasks):
        nb, sb, fl = moe_expert_work("MOE_DOWN", geo, dn.nbytes / n_local, items, slots)
        down.add((j, 0, 0), 0, nb, fl, (Read(-len(stages)),), stream=sb)
    stages.append(down)
    res = len(n.inputs) - 1 if a.residual else None
    coll = a.reduce and world > 1
    reduce = _reduce_stage("MOE_REDUCE", out, world if coll else 1, src=-len(stages), chunk_cols=None, res=res,
                           y_bytes=4, collective=coll)  # fmt: skip
    assert tuple(s.opcode for s in stages + [reduce]) == geo.stages
    return OpTiles(stages + [reduce], [len(stages)])


def _reduce_stage(opcode: str, out: Value, world: int, src: int, chunk_cols: int | None, res: int | None,
                  y_bytes: float | None = None, collective: bool = True) -> Stage:  # fmt: skip
    """Column blocks of an all-reduce (collective: over `world` ranks; else a local copy) with an
    optional residual add; y_bytes: bytes per element of the partial it reads (default: the output's)."""
    cols = COLLECTIVE_COLS
    W = out.shape[-1]
    st = Stage(opcode, cdiv(W, cols), cols, collective=collective)
    per_col = out.nbytes / W
    in_col = per_col if y_bytes is None else y_bytes * math.prod(out.shape[:-1])
    for c in range(st.chunks):
        lo, hi = c * cols, min(W, (c + 1) * cols)
        if chunk_cols:
            rd = Read(src, lo // chunk_cols, cdiv(hi, chunk_cols))
        else:  # a node input's columns, or every chunk of an earlier stage of this op
            rd = Read(src, lo, hi) if src >= 0 else Read(src)
        reads = (rd,) + ((Read(res, lo, hi),) if res is not None else ())
        nb = (in_col * world + per_col * 2) * (hi - lo)
        st.add((c, 0, 0), c, nb, comm=2 * (world - 1) * in_col * (hi - lo) / world, reads=reads)
    return st


def tile_collective(g: Graph, n: Node, ctx: Any) -> OpTiles:
    world = int(g.meta.get("world", 1))
    out = g.values[n.outputs[0]]
    if n.op == "all_gather":  # each task sends one block of local columns to every peer
        x = g.values[n.inputs[0]]
        cols = COLLECTIVE_COLS
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
    cols = GENERIC_COLS
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
