"""Fused MoE for decode (T = 1..16 tokens): router, routing, MXFP4 experts, weighted combine.

Four launches, no host round trip; only experts that received tokens read their weights:

1. `router_tile(X, Wr, L, Y, e_tile)` (grid E / 4, 256 threads): fp32 logits L[t, 4 experts] =
   x @ Wr^T on CUDA cores (each thread strides over H, then a block reduction through 64 KiB of
   shared memory); also zeroes its slice of the output Y [T, H] (combined with atomics in step 4).
2. `route_body(L, Bias, Idx, Wt, TokW, List, Count, off)` (1 CTA, 128 threads): one warp per token:
   sigmoid + selection bias in registers (E/32 per lane), top-k by k rounds of a warp argmax (two
   redux.sync reductions over order-preserving keys; ties to the lower expert id; the lane that held
   a pick hands its unbiased score over with a shuffle),
   weights = unbiased scores renormalised and scaled; writes Idx/Wt
   [T, k], TokW [E_local, T] (a token's weight for a local expert, 0 if not routed there) and the
   device-side active list List[0:Count] of local experts that received at least one token.
3. `gate_up_tile(X, GUb, GUs, List, Count, Hb, slot, n_tile)` (grid I/8 x max_slots): slot >=
   Count exits; else expert e = List[slot], rows [8 n_tile, +8) of gate and of up in one 16-row
   MXFP4 tile (tilert.kernels.mxfp4_gemm's mainloop), h = silu(g) * up -> Hb[slot, T, I] bf16.
4. `down_tile(Hb, Db, Ds, List, Count, TokW, Y, slot, n_tile, k_split)` (grid H/16 x
   max_slots*split): y = h @ down^T for 16 output features, times TokW[e, t], atomically added
   into Y [T, H] f32 (a partial sum over this rank's experts).

The persistent step stages x (gate/up) and Hb[slot] (down, Config.x_stage) in shared memory, kept
live across the task's items, so the mainloop's x loads skip one L2 round trip per k chunk.

Expert stacks: gate_up blocks [E, 2I, H/2] (gate rows then up rows), scales [E, 2I, H/32];
down blocks [E, H, I/2], scales [E, H, I/32]; router weight f32 [E_total, H], bias f32 [E_total].
"""

import dataclasses
import functools
import operator
import os
from dataclasses import dataclass
from typing import Any

import torch

from tilert.ir.opset.fused import MoeAttrs
from tilert.kernels import gemv
from tilert.kernels.common import build, cdiv, make_probe, per_mxfp4_order, prelude
from tilert.kernels.mxfp4_gemm import BLOCK_K, BLOCK_N, loop_shape, make_mainloop
from tilert.numerics import mxfp4
from tilert.ops.moe import moe_experts, route

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

TP = 16  # token tile (MMA N slot); T <= 16
ROUTER_E = 4  # experts per router CTA
THREADS = 256


@dataclass(frozen=True)
class Config:
    t: int  # tokens (<= 16)
    hidden: int
    inter: int
    n_experts: int  # router experts (all ranks)
    n_local: int
    top_k: int
    expert_offset: int = 0
    scaling: float = 1.0
    normalize: bool = True
    down_split: int = 1
    cta_threads: int = 0  # 0: the standalone launchers' own (loop_shape); 256 in the persistent kernel
    x_stage: bool = False  # down_tile's Hb is one slot's [rows, I] block (a shared-memory stage), not [S, TP, I]
    norm_eps: float | None = None  # router_tile reads raw x and applies the RMSNorm itself (see router_tile)

    @classmethod
    def for_node(cls, a: MoeAttrs, tokens: int, hidden: int, inter: int, n_experts: int, **kw: Any) -> "Config":
        """The config of a fused_moe node with attrs `a` (`supports` must hold); kw: the persistent
        step's overrides (cta_threads, x_stage, norm_eps, expert_offset)."""
        cfg = cls(tokens, hidden, inter, n_experts, a.n_local, a.top_k, a.expert_offset, a.scaling, a.normalize)
        return dataclasses.replace(cfg, **kw)

    @property
    def max_slots(self) -> int:
        return min(self.n_local, self.t * self.top_k)

    @property
    def block_m(self) -> int:  # tokens per expert tile (MMA N: 8, or 2 x 8)
        return 8 if self.t <= 8 else 16

    @property
    def gu_shape(self) -> tuple[int, int]:  # (threads, stages) of the gate_up CTA
        return self._shape(self.hidden // BLOCK_K)

    @property
    def down_shape(self) -> tuple[int, int]:
        return self._shape(self.inter // BLOCK_K // self.down_split)

    def _shape(self, chunks: int) -> tuple[int, int]:
        threads, stages = loop_shape(chunks)
        if self.cta_threads:  # a persistent CTA: its thread count, as many chunks in flight
            return self.cta_threads, max(1, min(8, cdiv(chunks, self.cta_threads // 32)))
        return threads, stages


def supports(tokens: int, hidden: int, inter: int, n_group: int = 1, persistent: bool = False) -> str | None:
    """None when the fused-MoE bodies take `tokens` tokens of width `hidden`, experts of width
    `inter` and `n_group` router groups; else why not. The standalone launchers take inter in
    multiples of 512, the persistent step's 256-thread bodies in multiples of 128."""
    inter_block = 128 if persistent else 512
    if n_group > 1:
        return f"{n_group} router groups (the route body selects over all experts)"
    if not 1 <= tokens <= TP:
        return f"T = {tokens} tokens; the fused MoE handles 1..{TP}"
    if hidden % 256 or inter % inter_block:
        return f"hidden {hidden} must be a multiple of 256 and intermediate {inter} of {inter_block}"
    return None


GU_COLS = 8  # h columns per gate_up_tile n_tile (8 gate rows + the 8 matching up rows: one BLOCK_N tile)
MOE_TASKS = 128  # MOE_GATE_UP and MOE_DOWN tasks per MoE node, about one per SM

# ---- the expert bodies of the persistent step: the MXFP4 mainloop (default) or the streaming GEMV ----

BODY_ENV = "TILERT_MOE_BODY"  # "gemv" (default) or "mainloop": which body the persistent expert tasks run
TILING_ENV = "TILERT_MOE_GEMV_TILING"  # optional "wr.g.depth/wr.g.depth" (gate/up / down) for the GEMV body
BODIES = ("mainloop", "gemv")
TOPK_ENV = "TILERT_MOE_TOPK"  # "task" (default) or "router": where the persistent step runs the top-k
TOPK_PLACES = ("router", "task")
LOADS_ENV = "TILERT_MOE_LOADS"  # "thread" (default) or "bulk": how the GEMV expert items' weights reach the ring
LOADS = ("thread", "bulk")
GEMV_SMEM = 200 * 1024  # the most shared memory an expert GEMV body may take (the step's other bodies' static
# buffers and its own reduction buffer live beside it in the SM's 227 KB)


def body_choice() -> str:
    """The persistent expert body the build switch TILERT_MOE_BODY names: "gemv" (default: the
    streaming GEMV's item form, `make_gemv_tasks`) or "mainloop" (one load round of registers per
    item, `make_bodies`)."""
    v = os.environ.get(BODY_ENV, "gemv") or "gemv"
    if v not in BODIES:
        raise ValueError(f"{BODY_ENV}={v!r}: expected one of {', '.join(BODIES)}")
    return v


def loads_choice() -> str:
    """TILERT_MOE_LOADS, how the GEMV expert items (`make_gemv_tasks`) load their weights: "thread"
    (default), 16-byte cp.async per thread into per-thread ring slots; "bulk", one cp.async.bulk
    per weight row and stage from warp 0 into row-major ring slots counted by mbarriers
    (gemv.Config.bulk): the same bytes in flight in a few large requests."""
    v = os.environ.get(LOADS_ENV, "thread") or "thread"
    if v not in LOADS:
        raise ValueError(f"{LOADS_ENV}={v!r}: expected one of {', '.join(LOADS)}")
    return v


def topk_place() -> str:
    """Where the persistent step runs the top-k (TILERT_MOE_TOPK): "task" (default), a MOE_TOPK task
    that waits for every router task, or "router", in whichever router task arrives last (an
    atomic arrival count; no stage of its own, so no hand-over between the router and the top-k).
    At full scale on the H100 the task was 2.2% faster at B=1 and even at B=8 (docs/performance.md):
    every router task pays the arrival's round trip, the hand-over it saves is one."""
    v = os.environ.get(TOPK_ENV, "task") or "task"
    if v not in TOPK_PLACES:
        raise ValueError(f"{TOPK_ENV}={v!r}: expected one of {', '.join(TOPK_PLACES)}")
    return v


@dataclass(frozen=True)
class GemvTiling:
    """The streaming GEMV configs of the expert items (`make_gemv_tasks`). gate/up: an item is one
    tile of `gu.rows` rows, the gate rows [n w, n w + w) of its expert and the matching up rows
    (w = gu.rows / 2 h columns) over all of H; down: `down.rows` output rows over all of I."""

    gu: gemv.Config  # m = tokens, n = 2I, k = H
    down: gemv.Config  # m = tokens, n = H, k = I

    @property
    def gu_width(self) -> int:
        return self.gu.rows // 2

    @property
    def down_rows(self) -> int:
        return self.down.rows


def _gemv_cfg(m: int, n: int, k: int, wr: int, g: int, depth: int, bulk: bool = False) -> gemv.Config:
    # plain cp.async, no L2 evict-first policy: with one, ptxas (CUDA 13.0) gave the weight loads of
    # the mimo verify step's expert tasks an odd descriptor register (desc[UR1]), which the H200
    # rejects as an illegal instruction (kernels/sass.py)
    return gemv.Config("mxfp4", m, n, k, wr=wr, g=g, split=1, depth=depth, evict_first=False, bulk=bulk)


def _parse_tiling(text: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """'wr.g.depth/wr.g.depth' -> ((wr, g, depth) gate/up, (wr, g, depth) down)."""
    try:
        gu, dn = (tuple(int(v) for v in part.split(".")) for part in text.split("/"))
        if len(gu) != 3 or len(dn) != 3:
            raise ValueError
    except ValueError:
        raise ValueError(f"{TILING_ENV}={text!r}: expected wr.g.depth/wr.g.depth (gate/up/down)") from None
    return gu, dn  # type: ignore[return-value]


def _fits(cfg: gemv.Config, x_buffers: int) -> bool:
    return cfg.depth - 1 <= cfg.items and gemv.item_smem_bytes(cfg, x_buffers) <= GEMV_SMEM


def _pick(m: int, n: int, k: int, gs: tuple[int, ...], depth: int, x_buffers: int,
          bulk: bool = False, min_wr: int = 1) -> gemv.Config | None:  # fmt: skip
    """The first tiling that fits: the fewest row warps (at least `min_wr`) whose k warps all get
    chunks, then g in the order given and the deepest ring up to `depth` (depth - 1 chunks a warp in
    flight, at most the chunks it has: the next item's first chunks ride in this one's last issue
    slots)."""
    chunks = cdiv(k, gemv.CHUNK_ELEMS["mxfp4"])
    wr = next((w for w in (1, 2, 4, 8) if w >= min_wr and gemv.WARPS // w <= chunks), 8)
    for g in gs:
        if 16 * g * wr > n:
            continue
        for d in range(depth, 1, -1):
            try:
                cfg = _gemv_cfg(m, n, k, wr, g, min(d, cdiv(chunks, gemv.WARPS // wr) + 1), bulk)
            except ValueError:  # its plain form alone is past the SM's shared memory
                continue
            if _fits(cfg, x_buffers):
                return cfg
    return None


def gemv_tiling(tokens: int, hidden: int, inter: int, bulk: bool | None = None) -> GemvTiling | None:
    """The GEMV body's tilings of a node, or None where they do not fit its shared memory (then the
    node keeps the mainloop body). gate/up: 32-row tiles (16 gate + 16 up rows) with 3 chunks of
    16 KB in flight, x staged once per task (every item reads all of it; the persistent-task-stream
    winner of benchmarks/gemv_sweep.py at the mimo expert shapes); down: 64-row tiles of two warps
    along rows (g = 2) with 4 chunks of 16 KB in flight (at full scale on an H100 the step took
    0.986x / 0.987x at B=1 / B=8 of one warp along rows with 2 chunks of 32 KB in flight;
    docs/performance.md), x = Hb[slot] double-buffered. Narrow shapes (fewer than 8 k chunks) put
    more warps along rows. TILERT_MOE_GEMV_TILING="wr.g.depth/wr.g.depth" forces both. bulk (default:
    the TILERT_MOE_LOADS switch): the bulk-copy ring (gemv.Config.bulk)."""
    bulk = loads_choice() == "bulk" if bulk is None else bulk
    forced = os.environ.get(TILING_ENV, "")
    if forced:
        (a, b, c), (d, e, f) = _parse_tiling(forced)
        try:
            gu = _gemv_cfg(tokens, 2 * inter, hidden, a, b, c, bulk)
            dn = _gemv_cfg(tokens, hidden, inter, d, e, f, bulk)
        except ValueError as err:
            raise ValueError(f"{TILING_ENV}={forced!r}: {err}") from None
        for name, cfg, nb in (("gate/up", gu, 1), ("down", dn, 2)):
            if not _fits(cfg, nb):
                need = gemv.item_smem_bytes(cfg, nb)
                raise ValueError(f"{TILING_ENV}: the {name} tiling needs depth - 1 <= {cfg.items} chunks and "
                                 f"{need} <= {GEMV_SMEM} bytes of shared memory: {cfg}")  # fmt: skip
        return GemvTiling(gu, dn)
    gu = _pick(tokens, 2 * inter, hidden, (2, 1), 4, x_buffers=1, bulk=bulk)
    dn = _pick(tokens, hidden, inter, (2, 1), 5, x_buffers=2, bulk=bulk, min_wr=2)
    return None if gu is None or dn is None else GemvTiling(gu, dn)


@dataclass(frozen=True)
class MoeTiling:
    """Task geometry of the fused MoE for the compiler's task tables (passes/tile.py), the persistent
    bodies (runtime/persistent/step.py) and the plan VM. The expert work is a list of items over
    the active slots only (slot < Count, known on the device after the top-k): gate/up item w is
    (slot, n_tile) = divmod(w, gu_tiles), down item w is (slot, n_tile, k_split); task j of a stage
    runs items j, j + tasks, ... So every SM gets work whether 1 or 8 slots are active, and idle
    slots cost no tasks.

    With the GEMV body (`gemv` set: TILERT_MOE_BODY=gemv) the items are its tiles (gu_width h
    columns, down_rows output rows, no k split) and task j runs the contiguous items
    [j W / tasks, (j + 1) W / tasks) of the W active ones, so its items stream back to back through
    one slot's rows (a down task restages Hb only when the slot changes). The task counts are the
    mainloop body's either way, so a table compiled for one body runs the other."""

    tokens: int
    hidden: int
    inter: int
    max_slots: int  # = Config.max_slots
    gu_tiles: int  # gate/up items (n tiles) per slot, gu_width h columns each
    gu_tasks: int  # MOE_GATE_UP tasks
    down_tiles: int  # down items (n tiles) per slot, down_rows output features each
    down_split: int  # MOE_DOWN k splits (Config.down_split)
    down_tasks: int  # MOE_DOWN tasks
    gemv: GemvTiling | None = None  # the GEMV body's tiles (None: the mainloop body's)
    topk_in_router: bool = False  # the top-k runs in the last-arriving router task (no MOE_TOPK stage)

    @property
    def stages(self) -> tuple[str, ...]:
        """The node's persistent stages (opcodes), in dependency order."""
        head = ("MOE_ROUTER",) if self.topk_in_router else ("MOE_ROUTER", "MOE_TOPK")
        return (*head, "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE")

    @property
    def body(self) -> str:
        return "mainloop" if self.gemv is None else "gemv"

    @property
    def gu_width(self) -> int:
        """h columns of one gate/up item."""
        return GU_COLS if self.gemv is None else self.gemv.gu_width

    @property
    def down_rows(self) -> int:
        """Output features of one down item."""
        return BLOCK_N if self.gemv is None else self.gemv.down_rows

    def _range(self, task: int, total: int, tasks: int) -> range:
        """The items of `task` among `total`: strided (mainloop body) or a contiguous share (GEMV)."""
        if self.gemv is None:
            return range(task, total, tasks)
        return range(task * total // tasks, (task + 1) * total // tasks)

    @property
    def gu_steps(self) -> int:
        """Items a gate/up task runs at most (all slots active)."""
        return cdiv(self.max_slots * self.gu_tiles, self.gu_tasks)

    @property
    def down_steps(self) -> int:
        return cdiv(self.max_slots * self.down_tiles * self.down_split, self.down_tasks)

    def gu_items(self, task: int, count: int) -> list[tuple[int, int]]:
        """(slot, n_tile) items gate/up task `task` runs when `count` slots are active."""
        return [divmod(w, self.gu_tiles) for w in self._range(task, count * self.gu_tiles, self.gu_tasks)]

    def down_items(self, task: int, count: int) -> list[tuple[int, int, int]]:
        """(slot, n_tile, k_split) items down task `task` runs when `count` slots are active."""
        per = self.down_tiles * self.down_split
        out = []
        for w in self._range(task, count * per, self.down_tasks):
            slot, r = divmod(w, per)
            out.append((slot, *divmod(r, self.down_split)))
        return out

    def gu_cols(self, n_tile: int) -> tuple[int, int]:
        """h columns [lo, hi) of Hb[slot] that gate/up n tile `n_tile` writes."""
        return n_tile * self.gu_width, min(self.inter, (n_tile + 1) * self.gu_width)

    def down_cols(self, n_tile: int) -> tuple[int, int]:
        """Output columns [lo, hi) of Y that down n tile `n_tile` adds into."""
        return n_tile * self.down_rows, min(self.hidden, (n_tile + 1) * self.down_rows)

    def down_k(self, k_split: int) -> tuple[int, int]:
        """h columns [lo, hi) (the down GEMM's k) that k split `k_split` reduces."""
        kc = self.inter // self.down_split
        return k_split * kc, self.inter if k_split == self.down_split - 1 else (k_split + 1) * kc


def tiling(tokens: int, hidden: int, inter: int, n_local: int, top_k: int, down_split: int = Config.down_split,
           tasks: int = MOE_TASKS, body: str | None = None, topk: str | None = None) -> MoeTiling:  # fmt: skip
    """The fused MoE's task geometry for T tokens (pure python, no tilelang: any shape, tiny too).
    body: "mainloop" or "gemv" (default: the TILERT_MOE_BODY switch); the GEMV body where its tiling
    fits the node (`gemv_tiling`) and down_split is 1, else the mainloop's. topk: "router" or "task"
    (default: the TILERT_MOE_TOPK switch, `topk_place`)."""
    slots = min(n_local, tokens * top_k)
    gu, dn = cdiv(inter, GU_COLS), cdiv(hidden, BLOCK_N)
    gu_tasks, dn_tasks = min(tasks, slots * gu), min(tasks, slots * dn * down_split)
    gt = gemv_tiling(tokens, hidden, inter) if (body or body_choice()) == "gemv" and down_split == 1 else None
    if gt is not None:  # the GEMV body's items, the same task counts
        gu, dn = cdiv(inter, gt.gu_width), cdiv(hidden, gt.down_rows)
    place = topk or topk_place()
    if place not in TOPK_PLACES:
        raise ValueError(f"top-k place {place!r}: expected one of {', '.join(TOPK_PLACES)}")
    fused = place == "router"
    return MoeTiling(tokens, hidden, inter, slots, gu, gu_tasks, dn, down_split, dn_tasks, gt, fused)


def make_bodies(cfg: Config):
    """The four tile bodies (T.macro) of the fused MoE."""
    import tilelang.language as T

    probe = make_probe()  # phases (TILERT_PROBES): router 0 dot products, 1 reduced, 2 written; top-k
    # 0 outputs cleared, 1 scores in registers, 2 k rounds, 3 weights written, 4 barrier, 5 active list

    H, In, E, EL, K = cfg.hidden, cfg.inter, cfg.n_experts, cfg.n_local, cfg.top_k
    Tn = cfg.t
    R = ROUTER_E * Tn
    bm = cfg.block_m
    nk_gu = H // BLOCK_K
    nk_dn = In // BLOCK_K // cfg.down_split
    gu_loop = make_mainloop(bm, BLOCK_N, BLOCK_K, *cfg.gu_shape, w3d=True, two=True, m_valid=Tn)
    dn_loop = make_mainloop(bm, BLOCK_N, BLOCK_K, *cfg.down_shape, w3d=True, x3d=not cfg.x_stage, m_valid=Tn)
    n_tiles = cdiv(E, ROUTER_E)
    zero_per_cta = cdiv(Tn * H, n_tiles)
    eps = cfg.norm_eps
    RR = R + (Tn if eps is not None else 0)  # reduced rows: the logits, then each token's sum of squares
    xh_cols = cdiv(H, n_tiles)  # columns of the normalised rows each task writes (with a norm)
    GR = min(32, THREADS // RR)  # lanes per reduced row, a power of two
    GR = 1 << (GR.bit_length() - 1)
    GR_SHIFTS = [GR >> k for k in range(1, GR.bit_length())]  # GR/2, ..., 1

    @T.macro
    def router_tile(X, Wr, L, Y, e_tile, Gamma, Xh):
        # With cfg.norm_eps (the persistent step's fused pre-MoE RMSNorm), X is the raw residual
        # stream and Wr the router weight times the norm's gamma: logits = rstd[t] * (x[t] . Wr[e]),
        # the sums of squares accumulated in the same pass, so no task normalises whole rows
        # before its dot products (at 8 tokens that pass was two thirds of the task). Each task
        # also writes its xh_cols columns of bf16(rms_norm(x)) to Xh for the gate/up tasks.
        acc = T.alloc_local((RR,), "float32")
        xv = T.alloc_local((Tn * 4,), "bfloat16")
        wv = T.alloc_local((ROUTER_E * 4,), "float32")
        red = T.alloc_shared((RR, THREADS + 8), "float32")  # +8: a group's rows start in different banks
        tx = T.get_thread_binding()
        for z in T.serial(cdiv(zero_per_cta, THREADS)):
            f = e_tile * zero_per_cta + z * THREADS + tx
            if z * THREADS + tx < zero_per_cta and f < Tn * H:
                Y[f // H, f % H] = 0.0
        for i in T.unroll(RR):
            acc[i] = 0.0
        # 16-byte loads of 4 consecutive router weights per expert, 8-byte loads of x (only the
        # Tn real tokens); all iterations unrolled so every load is issued before the FMAs
        for hc in T.unroll(cdiv(H, THREADS * 4)):
            h = (hc * THREADS + tx) * 4
            if h < H:
                for e in T.unroll(ROUTER_E):
                    for v in T.vectorized(4):
                        wv[e * 4 + v] = Wr[T.min(e_tile * ROUTER_E + e, E - 1), h + v]
                for t in T.unroll(Tn):
                    for v in T.vectorized(4):
                        xv[t * 4 + v] = X[t, h + v]
                for e in T.unroll(ROUTER_E):
                    for t in T.unroll(Tn):
                        for v in T.unroll(4):
                            acc[e * Tn + t] += wv[e * 4 + v] * T.cast(xv[t * 4 + v], "float32")
                if eps is not None:
                    for t in T.unroll(Tn):
                        for v in T.unroll(4):
                            acc[R + t] += T.cast(xv[t * 4 + v], "float32") * T.cast(xv[t * 4 + v], "float32")
        # Reduce the RR partial rows in one pass: a group of GR lanes per row, each lane summing
        # THREADS / GR columns, then a butterfly over the group (a fragment reduce_sum ran one
        # CTA-wide all-reduce per row: 32 barrier rounds at 8 tokens).
        for i in T.unroll(RR):  # unrolled: acc stays in registers
            red[i, tx] = acc[i]
        probe(0)
        T.sync_threads()
        ri = T.min(tx // GR, RR - 1)  # every lane takes part in the shuffles; spare groups repeat row RR - 1
        tot = T.alloc_var("float32")
        tot = 0.0
        for q in T.unroll(THREADS // GR):
            tot += red[ri, q * GR + tx % GR]
        for sh in GR_SHIFTS:
            tot += T.shfl_xor(tot, sh)
        probe(1)
        if eps is None:
            if tx // GR < R and tx % GR == 0 and e_tile * ROUTER_E + ri // Tn < E:
                L[ri % Tn, e_tile * ROUTER_E + ri // Tn] = tot
        else:
            tots = T.alloc_shared((RR,), "float32")
            if tx // GR < RR and tx % GR == 0:
                tots[ri] = tot
            T.sync_threads()
            if tx < R and e_tile * ROUTER_E + tx // Tn < E:
                L[tx % Tn, e_tile * ROUTER_E + tx // Tn] = tots[tx] * T.rsqrt(tots[R + tx % Tn] / H + eps)
            for z in T.serial(cdiv(Tn * xh_cols, THREADS)):
                f = z * THREADS + tx
                c = e_tile * xh_cols + f % xh_cols
                if f < Tn * xh_cols and c < H:
                    Xh[f // xh_cols, c] = T.cast(
                        T.cast(X[f // xh_cols, c], "float32") * T.rsqrt(tots[R + f // xh_cols] / H + eps)
                        * T.cast(Gamma[c], "float32"), "bfloat16")  # fmt: skip
        probe(2)

    RT = cfg.cta_threads or 128  # route CTA threads: 128 standalone, the persistent CTA's otherwise
    NW, EPL = RT // 32, cdiv(E, 32)
    NEG = -T.infinity("float32")

    @T.macro
    def route_body(L, Bias, Idx, Wt, TokW, List, Count, off):
        # off: this rank's first expert id (an int, or a value the persistent step loads per rank)
        # One warp per token (tokens w, w + NW, ...): lane l holds the biased scores of experts
        # l, l + 32, ... in registers; k rounds of a warp argmax (the larger score, ties to the lower
        # expert id, as torch.topk on the reference) pick the experts in score order. The rounds are
        # a loop, not unrolled: the body runs once per layer on one SM, so its code is fetched cold
        # and k unrolled copies cost more in instruction fetch than the loop does in branches.
        T.import_source(prelude())
        hit = T.alloc_shared((EL,), "int32")
        sc = T.alloc_local((EPL,), "float32")
        sg = T.alloc_local((EPL,), "float32")  # the unbiased scores: a pick's weight without reloading L
        pick = T.alloc_var("float32")
        myw = T.alloc_var("float32")
        bv = T.alloc_var("float32")
        bi = T.alloc_var("int32")
        key = T.alloc_var("uint32")
        best = T.alloc_var("uint32")
        myi = T.alloc_var("int32")
        wv = T.alloc_var("float32")
        ws = T.alloc_var("float32")
        cnt = T.alloc_var("int32")
        tx = T.get_thread_binding()
        lane, warp = tx % 32, tx // 32
        for z in T.serial(cdiv(EL * TP, RT)):
            f = z * RT + tx
            if f < EL * TP:
                TokW[f // TP, f % TP] = 0.0
        for z in T.serial(cdiv(EL, RT)):
            if z * RT + tx < EL:
                hit[z * RT + tx] = 0
        T.sync_threads()
        probe(0)
        for tt in T.serial(cdiv(Tn, NW)):
            t = tt * NW + warp
            if t < Tn:  # warp-uniform: the shuffles below run with the whole warp
                # every load first, then the math: the compiler interleaves them otherwise, and each
                # sigmoid's IEEE division (a call to its slow path, which loads do not cross) kept
                # the 12 loads one round trip apart (2.4 us of the body at B=1 on an H100, seen with
                # the phase probes, whose stores happened to keep the loads together). The warp
                # barrier is the fence the loads may not move past.
                for i in T.unroll(EPL):  # coalesced loads straight into registers
                    ec = T.min(i * 32 + lane, E - 1)
                    sg[i] = L[t, ec]
                    sc[i] = Bias[ec]
                T.sync_warp()
                for i in T.unroll(EPL):
                    sg[i] = T.sigmoid(sg[i])
                    sc[i] = T.if_then_else(i * 32 + lane < E, sg[i] + sc[i], NEG)
                probe(1)
                myi = 0
                myw = 0.0
                for j in T.serial(K):
                    bv = NEG
                    bi = E
                    for i in T.unroll(EPL):
                        if sc[i] > bv:
                            bv = sc[i]
                            bi = i * 32 + lane
                    # the warp's largest score, ties to the lower expert id: a max and then a min
                    # reduction (redux.sync) over order-preserving 32-bit keys of the scores, not
                    # five dependent rounds of two shuffles (2.6 us of 8 rounds at B=1 on an H100)
                    key = T.reinterpret(bv, "uint32")
                    key = T.if_then_else(key >= T.uint32(0x80000000), ~key, key | T.uint32(0x80000000))
                    best = T.call_extern("uint32", "__reduce_max_sync", T.uint32(0xFFFFFFFF), key)
                    bi = T.Cast("int32", T.call_extern("uint32", "__reduce_min_sync", T.uint32(0xFFFFFFFF),
                                                       T.if_then_else(key == best, T.Cast("uint32", bi),
                                                                      T.uint32(0xFFFFFFFF))))  # fmt: skip
                    pick = 0.0
                    for i in T.unroll(EPL):
                        if bi == i * 32 + lane:
                            sc[i] = NEG
                            pick = sg[i]
                    pick = T.shfl_sync(pick, bi % 32)  # from the lane that held the pick
                    if lane == j:
                        myi = bi
                        myw = pick
                probe(2)
                wv = T.if_then_else(lane < K, myw, 0.0)
                ws = wv
                for sh in [16, 8, 4, 2, 1]:
                    ws = ws + T.shfl_xor(ws, sh)
                if lane < K:
                    if cfg.normalize:
                        wv = wv / (ws + 1e-20) * cfg.scaling
                    else:
                        wv = wv * cfg.scaling
                    Idx[t, lane] = myi
                    Wt[t, lane] = wv
                    if myi >= off and myi < off + EL:
                        TokW[myi - off, t] = wv
                        hit[myi - off] = 1
                probe(3)
        T.sync_threads()
        probe(4)
        # the active list in expert order, 32 experts per ballot (warp 0; no serial loop over E_local)
        hv = T.alloc_var("int32")
        bal = T.alloc_var("uint32")  # a variable: the ballot runs once, with the whole warp
        if warp == 0:
            cnt = 0
            for z in T.unroll(cdiv(EL, 32)):
                hv = T.if_then_else(z * 32 + lane < EL, hit[T.min(z * 32 + lane, EL - 1)], 0)
                bal = T.call_extern("uint32", "tilert_ballot", hv)
                if hv != 0:
                    List[cnt + T.call_extern("int32", "tilert_popc_below", bal, lane)] = z * 32 + lane
                cnt = cnt + T.call_extern("int32", "tilert_popc", bal)
            if lane == 0:
                Count[0] = cnt
        probe(5)

    # The expert id is read once into a register: an expression List[slot] would be re-read from
    # global memory at every weight address of the mainloop (ncu: the top stall of both bodies).
    @T.macro
    def gate_up_tile(X, GUb, GUs, List, Count, Hb, slot, n_tile):
        if slot < Count[0]:
            c_s = T.alloc_shared((BLOCK_N, bm), "float32")
            e = T.alloc_var("int32")
            e = List[slot]
            gu_loop(X, 0, 0, GUb, GUs, e, n_tile * 8, In + n_tile * 8, 0, nk_gu, c_s)
            for i, j in T.Parallel(8, bm):
                g = c_s[i, j]
                Hb[slot, j, n_tile * 8 + i] = T.cast(g / (1.0 + T.exp(-g)) * c_s[i + 8, j], "bfloat16")

    @T.macro
    def down_tile(Hb, Db, Ds, List, Count, TokW, Y, slot, n_tile, k_split):
        if slot < Count[0]:
            c_s = T.alloc_shared((BLOCK_N, bm), "float32")
            e = T.alloc_var("int32")
            e = List[slot]
            dn_loop(Hb, slot, 0, Db, Ds, e, n_tile * BLOCK_N, 0, k_split * nk_dn, nk_dn, c_s)
            for i, j in T.Parallel(BLOCK_N, bm):
                if j < Tn and n_tile * BLOCK_N + i < H:
                    T.atomic_add(Y[j, n_tile * BLOCK_N + i], c_s[i, j] * TokW[e, j])

    return router_tile, route_body, gate_up_tile, down_tile


def _sum(terms: Any) -> Any:
    """Sum of TIR expressions without a Python 0."""
    return functools.reduce(operator.add, terms)


def make_gemv_tasks(cfg: Config, til: MoeTiling, import_prelude: bool = True):
    """The expert tasks of the GEMV body (TILERT_MOE_BODY=gemv, `til.gemv` set): T.macros
    `gate_up_task(X, GUb, GUs, List, Count, Hb, j)` and `down_task(Hb, Db, Ds, List, Count, TokW, Y, j)`.

    Task j runs its contiguous share of the Count x tiles active items (MoeTiling.gu_items /
    down_items) through the streaming GEMV's item form (gemv.make_body(..., items=)): per-thread
    cp.async rings, depth - 1 chunks in flight, and each item issues the next item's first chunks
    and block scales in its own last issue slots, so a task's weights stream back to back across
    its items; the expert id List[slot] is read once per item into a register.
    gate/up: a tile row r < w (w = gu.rows / 2) is gate row n w + r of expert List[slot], r >= w
    up row I + n w + r - w; x (all T rows of X) is staged once per task; the epilogue writes
    Hb[slot, t, n w + r] = bf16(silu(g) * u). down: tile row r is output feature n R + r; x =
    Hb[slot] rows, restaged (double-buffered) only when the slot changes; the epilogue adds
    partial x TokW[e, t] into Y with float32 atomics (Y zeroed by the router tasks).
    import_prelude=False: the caller imports a prelude holding gemv.GEMV_PRELUDE."""
    import tilelang.language as T

    gt = til.gemv
    if gt is None:
        raise ValueError(f"no GEMV tiling for the MoE at T={cfg.t}, H={cfg.hidden}, I={cfg.inter}")
    H, In, EL, Tn, S = cfg.hidden, cfg.inter, cfg.n_local, cfg.t, til.max_slots
    gu, dn = gt.gu, gt.down
    W, RG, R = gt.gu_width, gu.rows, gt.down_rows
    MTG, MTD = 8 * gu.nt, 8 * dn.nt  # token columns of the bodies' reduction buffers
    GUT, DNT = til.gu_tiles, til.down_tiles

    @T.macro
    def gu_store(Hb, it, red, tx):
        for z in T.serial(cdiv(W * Tn, THREADS)):
            idx = z * THREADS + tx
            if idx < W * Tn:
                lr, tok = idx % W, idx // W
                if it[2] * W + lr < In:
                    g = _sum(red[(w * MTG + tok) * RG + lr] for w in range(gu.wk))
                    u = _sum(red[(w * MTG + tok) * RG + W + lr] for w in range(gu.wk))
                    Hb[it[1], tok, it[2] * W + lr] = T.cast(g / (1.0 + T.exp(-g)) * u, "bfloat16")

    @T.macro
    def dn_store(O, it, red, tx):
        for z in T.serial(cdiv(R * Tn, THREADS)):
            idx = z * THREADS + tx
            if idx < R * Tn:
                lr, tok = idx % R, idx // R
                if it[2] * R + lr < H:
                    part = _sum(red[(w * MTD + tok) * R + lr] for w in range(dn.wk))
                    T.atomic_add(O[0][tok, it[2] * R + lr], part * O[1][it[0], tok])

    # an item is (expert, slot, n tile)
    gu_map = gemv.ItemMap(
        w_rows=EL * 2 * In,
        x_rows=TP,
        w_row=lambda it, lr: (
            it[0] * (2 * In) + (lr // W) * In + T.min(it[2] * W + lr % W, In - 1),
            it[2] * W + lr % W < In,
        ),  # fmt: skip
        x_row=lambda it, t: t,
        epilogue=gu_store,
        x_buffers=1,
    )
    dn_map = gemv.ItemMap(
        w_rows=EL * H,
        x_rows=S * TP,
        w_row=lambda it, lr: (it[0] * H + T.min(it[2] * R + lr, H - 1), it[2] * R + lr < H),
        x_row=lambda it, t: it[1] * TP + t,
        epilogue=dn_store,
        x_buffers=2,
    )
    gu_item = gemv.make_body(gu, import_prelude, items=gu_map)
    dn_item = gemv.make_body(dn, import_prelude, items=dn_map)

    @T.macro
    def gate_up_task(X, GUb, GUs, List, Count, Hb, j):
        total = T.alloc_var("int32")  # active items; Count read once
        total = Count[0] * GUT
        lo = T.alloc_var("int32")
        lo = j * total // til.gu_tasks
        steps = T.alloc_var("int32")
        steps = T.min((j + 1) * total // til.gu_tasks - lo, til.gu_steps)
        e = T.alloc_var("int32")
        en = T.alloc_var("int32")
        for u in T.serial(steps):
            w = lo + u
            wn = T.min(w + 1, total - 1)  # the next item (issued only if u + 1 < steps)
            e = List[w // GUT]
            en = List[wn // GUT]
            gu_item(X, GUb, GUs, Hb, (e, w // GUT, w % GUT), (en, wn // GUT, wn % GUT), u + 1 < steps, u == 0,
                    u % 2, 0, False, u * gu.items)  # fmt: skip

    @T.macro
    def down_task(Hb, Db, Ds, List, Count, TokW, Y, j):
        total = T.alloc_var("int32")
        total = Count[0] * DNT
        lo = T.alloc_var("int32")
        lo = j * total // til.down_tasks
        steps = T.alloc_var("int32")
        steps = T.min((j + 1) * total // til.down_tasks - lo, til.down_steps)
        e = T.alloc_var("int32")
        en = T.alloc_var("int32")
        xb = T.alloc_var("int32")  # the x buffer holding this item's slot's Hb rows
        xb = 0
        for u in T.serial(steps):
            w = lo + u
            wn = T.min(w + 1, total - 1)
            e = List[w // DNT]
            en = List[wn // DNT]
            dn_item(Hb, Db, Ds, (Y, TokW), (e, w // DNT, w % DNT), (en, wn // DNT, wn % DNT), u + 1 < steps,
                    u == 0, u % 2, xb, wn // DNT != w // DNT, u * dn.items)  # fmt: skip
            if wn // DNT != w // DNT:
                xb = 1 - xb

    return gate_up_task, down_task


def make_kernels(cfg: Config):
    """Four standalone launchers, one per body."""
    import tilelang.language as T

    router_tile, route_body, gate_up_tile, down_tile = make_bodies(cfg)
    H, In, E, EL, K, Tn, S = cfg.hidden, cfg.inter, cfg.n_experts, cfg.n_local, cfg.top_k, cfg.t, cfg.max_slots

    @T.prim_func
    def moe_router(
        X: T.Tensor((TP, H), "bfloat16"),
        Wr: T.Tensor((E, H), "float32"),
        L: T.Tensor((TP, E), "float32"),
        Y: T.Tensor((Tn, H), "float32"),
    ):
        with T.Kernel(cdiv(E, ROUTER_E), threads=THREADS) as bx:
            router_tile(X, Wr, L, Y, bx, None, None)

    @T.prim_func
    def moe_route(
        L: T.Tensor((TP, E), "float32"),
        Bias: T.Tensor((E,), "float32"),
        Idx: T.Tensor((TP, K), "int32"),
        Wt: T.Tensor((TP, K), "float32"),
        TokW: T.Tensor((EL, TP), "float32"),
        List: T.Tensor((EL,), "int32"),
        Count: T.Tensor((1,), "int32"),
    ):
        with T.Kernel(1, threads=cfg.cta_threads or 128) as _:
            route_body(L, Bias, Idx, Wt, TokW, List, Count, cfg.expert_offset)

    @T.prim_func
    def moe_gate_up(
        X: T.Tensor((TP, H), "bfloat16"),
        GUb: T.Tensor((EL, 2 * In, H // 2), "uint8"),
        GUs: T.Tensor((EL, 2 * In, H // 32), "uint8"),
        List: T.Tensor((EL,), "int32"),
        Count: T.Tensor((1,), "int32"),
        Hb: T.Tensor((S, TP, In), "bfloat16"),
    ):
        with T.Kernel(In // 8, S, threads=cfg.gu_shape[0]) as (bx, by):
            gate_up_tile(X, GUb, GUs, List, Count, Hb, by, bx)

    @T.prim_func
    def moe_down(
        Hb: T.Tensor((S, TP, In), "bfloat16"),
        Db: T.Tensor((EL, H, In // 2), "uint8"),
        Ds: T.Tensor((EL, H, In // 32), "uint8"),
        List: T.Tensor((EL,), "int32"),
        Count: T.Tensor((1,), "int32"),
        TokW: T.Tensor((EL, TP), "float32"),
        Y: T.Tensor((Tn, H), "float32"),
    ):
        with T.Kernel(cdiv(H, BLOCK_N), S * cfg.down_split, threads=cfg.down_shape[0]) as (bx, by):
            down_tile(Hb, Db, Ds, List, Count, TokW, Y, by // cfg.down_split, bx, by % cfg.down_split)

    return moe_router, moe_route, moe_gate_up, moe_down


@per_mxfp4_order
def compiled(cfg: Config):
    return tuple(build(f) for f in make_kernels(cfg))


def make_gemv_task_kernels(cfg: Config, til: MoeTiling):
    """Standalone launchers of the GEMV body's expert tasks: one CTA (256 threads) per task, the
    step's task count and item split (`til`), so a task streams its items as in the step."""
    import tilelang.language as T

    gate_up_task, down_task = make_gemv_tasks(cfg, til)
    H, In, EL, Tn, S = cfg.hidden, cfg.inter, cfg.n_local, cfg.t, til.max_slots

    @T.prim_func
    def moe_gate_up_stream(
        X: T.Tensor((TP, H), "bfloat16"),
        GUb: T.Tensor((EL, 2 * In, H // 2), "uint8"),
        GUs: T.Tensor((EL, 2 * In, H // 32), "uint8"),
        List: T.Tensor((EL,), "int32"),
        Count: T.Tensor((1,), "int32"),
        Hb: T.Tensor((S, TP, In), "bfloat16"),
    ):
        with T.Kernel(til.gu_tasks, threads=THREADS) as bx:
            gate_up_task(X, GUb, GUs, List, Count, Hb, bx)

    @T.prim_func
    def moe_down_stream(
        Hb: T.Tensor((S, TP, In), "bfloat16"),
        Db: T.Tensor((EL, H, In // 2), "uint8"),
        Ds: T.Tensor((EL, H, In // 32), "uint8"),
        List: T.Tensor((EL,), "int32"),
        Count: T.Tensor((1,), "int32"),
        TokW: T.Tensor((EL, TP), "float32"),
        Y: T.Tensor((Tn, H), "float32"),
    ):
        with T.Kernel(til.down_tasks, threads=THREADS) as bx:
            down_task(Hb, Db, Ds, List, Count, TokW, Y, bx)

    return moe_gate_up_stream, moe_down_stream


@per_mxfp4_order
def compiled_gemv_tasks(cfg: Config, til: MoeTiling):
    what = f"MoE GEMV expert tasks T={cfg.t} H={cfg.hidden} I={cfg.inter} ({til.gemv})"
    return tuple(build(f, what=what) for f in make_gemv_task_kernels(cfg, til))


def check_gemv_tasks(t: int, hidden: int, inter: int, n_local: int, top_k: int, active: int, seed: int | None = None,
                     device: str = "cuda", kernels: Any = None) -> tuple[float, float]:  # fmt: skip
    """The GEMV body's expert tasks (standalone, `make_gemv_task_kernels`) on fresh random inputs:
    `active` random local experts in List, the slots' Hb NaN-poisoned, TokW NaN for the experts
    and token rows no task may read. Returns the relative errors (float64 norms) of Hb[:active,
    :t] (bf16) and of Y (float32, from the kernel's Hb) against the float64 reference; raises if a
    slot or token row past the active ones was written. kernels: (gate/up, down) callables in place
    of the compiled tasks (tests of this check)."""
    from tilert.ops.linear import dequant_mxfp4

    til = tiling(t, hidden, inter, n_local, top_k, body="gemv")
    if til.gemv is None or not 1 <= active <= til.max_slots:
        raise ValueError(f"T={t} H={hidden} I={inter}: no GEMV tiling, or {active} active of {til.max_slots} slots")
    cfg = Config(t, hidden, inter, n_local, n_local, top_k)
    k_gu, k_dn = kernels or compiled_gemv_tasks(cfg, til)
    dev = device
    g = torch.Generator(device=dev)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    gub = torch.empty(n_local, 2 * inter, hidden // 2, dtype=torch.uint8, device=dev)
    gus = torch.empty(n_local, 2 * inter, hidden // 32, dtype=torch.uint8, device=dev)
    dnb = torch.empty(n_local, hidden, inter // 2, dtype=torch.uint8, device=dev)
    dns = torch.empty(n_local, hidden, inter // 32, dtype=torch.uint8, device=dev)
    for e in range(n_local):  # one expert at a time: the float32 stacks of 48 experts would take 7 GB
        gub[e], gus[e] = mxfp4.quantize(torch.randn(2 * inter, hidden, device=dev, generator=g) * 0.05)
        dnb[e], dns[e] = mxfp4.quantize(torch.randn(hidden, inter, device=dev, generator=g) * 0.05)
    x = torch.zeros(TP, hidden, dtype=torch.bfloat16, device=dev)
    x[:t] = torch.randn(t, hidden, device=dev, generator=g).to(torch.bfloat16)
    experts = torch.randperm(n_local, device=dev, generator=g)[:active].sort().values
    lst = torch.full((n_local,), -1, dtype=torch.int32, device=dev)
    lst[:active] = experts.to(torch.int32)
    cnt = torch.tensor([active], dtype=torch.int32, device=dev)
    tokw = torch.full((n_local, TP), float("nan"), device=dev)
    w = torch.rand(active, t, device=dev, generator=g)
    w = torch.where(w < 0.3, torch.zeros_like(w), w)  # a token not routed there: weight 0
    w[0] = w[0].clamp(min=0.3)  # but every token reaches the first active expert: Y's reference is never zero
    tokw[experts, :t] = w
    hb = torch.full((til.max_slots, TP, inter), float("nan"), dtype=torch.bfloat16, device=dev)
    k_gu(x, gub, gus, lst, cnt, hb)
    y = torch.zeros(t, hidden, dtype=torch.float32, device=dev)
    k_dn(hb, dnb, dns, lst, cnt, tokw, y)
    if y.is_cuda:
        torch.cuda.synchronize()
    if not hb[active:].isnan().all() or not hb[:active, t:].isnan().all():
        raise AssertionError("a task wrote Hb past the active slots or the tokens")
    xs = x[:t].double()
    h_ref, y_ref = [], torch.zeros(t, hidden, dtype=torch.float64, device=dev)
    for s_, e in enumerate(experts.tolist()):
        wgu = dequant_mxfp4(gub[e], gus[e]).double()
        gate, up = xs @ wgu[:inter].t(), xs @ wgu[inter:].t()
        h_ref.append(gate * torch.sigmoid(gate) * up)
        wd = dequant_mxfp4(dnb[e], dns[e]).double()
        y_ref += (hb[s_, :t].double() @ wd.t()) * tokw[e, :t, None].double()
    return gemv.rel_err(hb[:active, :t], torch.stack(h_ref)), gemv.rel_err(y, y_ref)


def reference(x, router_w, bias, gate_up, down, *, top_k, expert_offset=0, normalize=True, scaling=1.0):
    """Torch reference: route(x @ Wr^T) then moe_experts (tilert.ops.moe)."""
    logits = x.float() @ router_w.float().t()
    idx, w = route(logits, bias, top_k=top_k, normalize=normalize, scaling=scaling)
    return moe_experts(x.float(), idx, w, gate_up, down, expert_offset=expert_offset), idx, w


def _check(x, router_w, bias, gate_up, down, top_k):
    if x.dim() != 2 or x.dtype != torch.bfloat16:
        raise TypeError(f"x must be bf16 [T, H]; got {x.dtype} {tuple(x.shape)}")
    t, h = x.shape
    (gb, gs), (db, ds) = gate_up, down
    el, two_i = gb.shape[0], gb.shape[1]
    inter = two_i // 2
    e = router_w.shape[0]
    want = {
        "router_w": (router_w, (e, h), torch.float32),
        "bias": (bias, (e,), torch.float32),
        "gate_up blocks": (gb, (el, 2 * inter, h // 2), torch.uint8),
        "gate_up scales": (gs, (el, 2 * inter, h // 32), torch.uint8),
        "down blocks": (db, (el, h, inter // 2), torch.uint8),
        "down scales": (ds, (el, h, inter // 32), torch.uint8),
    }
    for name, (ten, shape, dt) in want.items():
        if tuple(ten.shape) != shape:
            raise ValueError(f"{name} shape {tuple(ten.shape)} != expected {shape}")
        if ten.dtype != dt:
            raise TypeError(f"{name} dtype {ten.dtype} != {dt}")
    if (why := supports(t, h, inter)) is not None:
        raise ValueError(why)
    if top_k > e:
        raise ValueError(f"top_k {top_k} > experts {e}")
    return Config(t, h, inter, e, el, top_k)


def run(x, router_w, bias, gate_up, down, *, top_k, expert_offset=0, normalize=True, scaling=1.0, cfg=None):
    """Fused MoE: returns (y [T, H] f32 partial sum over local experts, idx [T, k], weights [T, k])."""
    base = _check(x, router_w, bias, gate_up, down, top_k)
    cfg = cfg or Config(
        base.t, base.hidden, base.inter, base.n_experts, base.n_local, top_k, expert_offset, scaling, normalize
    )
    k_router, k_route, k_gu, k_down = compiled(cfg)
    dev, t, h = x.device, cfg.t, cfg.hidden
    xp = torch.zeros(TP, h, dtype=torch.bfloat16, device=dev)
    xp[:t] = x
    logits = torch.empty(TP, cfg.n_experts, dtype=torch.float32, device=dev)
    y = torch.empty(t, h, dtype=torch.float32, device=dev)
    idx = torch.empty(TP, top_k, dtype=torch.int32, device=dev)
    wt = torch.empty(TP, top_k, dtype=torch.float32, device=dev)
    tokw = torch.empty(cfg.n_local, TP, dtype=torch.float32, device=dev)
    lst = torch.empty(cfg.n_local, dtype=torch.int32, device=dev)
    cnt = torch.empty(1, dtype=torch.int32, device=dev)
    hb = torch.empty(cfg.max_slots, TP, cfg.inter, dtype=torch.bfloat16, device=dev)
    k_router(xp, router_w, logits, y)
    k_route(logits, bias, idx, wt, tokw, lst, cnt)
    k_gu(xp, gate_up[0], gate_up[1], lst, cnt, hb)
    k_down(hb, down[0], down[1], lst, cnt, tokw, y)
    return y, idx[:t], wt[:t]


def make_inputs(t, hidden, inter, n_experts, n_local, *, seed=None, device="cuda"):
    """Random MoE weights (MXFP4 experts) and tokens for tests and benchmarks."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(t, hidden, device=device, generator=g).to(torch.bfloat16)
    router_w = torch.randn(n_experts, hidden, device=device, generator=g) * hidden**-0.5
    bias = torch.randn(n_experts, device=device, generator=g) * 0.1
    gate_up = mxfp4.quantize(torch.randn(n_local, 2 * inter, hidden, device=device, generator=g) * 0.05)
    down = mxfp4.quantize(torch.randn(n_local, hidden, inter, device=device, generator=g) * 0.05)
    return x, router_w, bias, gate_up, down


def check(t, hidden, inter, n_experts, n_local, top_k, expert_offset=0, seed=None) -> float:
    """Fresh random inputs; returns ||y - ref|| / ||ref|| (raises if routing differs or y not finite)."""
    x, rw, b, gu, dn = make_inputs(t, hidden, inter, n_experts, n_local, seed=seed)
    y, idx, wt = run(x, rw, b, gu, dn, top_k=top_k, expert_offset=expert_offset)
    ref, ridx, rwt = reference(x, rw, b, gu, dn, top_k=top_k, expert_offset=expert_offset)
    if not torch.equal(idx.sort(-1).values, ridx.sort(-1).values):
        raise AssertionError(f"routing differs: {idx.tolist()} vs {ridx.tolist()}")
    if not torch.isfinite(y).all():
        raise AssertionError("output has non-finite elements")
    if ref.norm() == 0:
        return float(y.norm())
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# mimo-v2.5-pro per rank of 8: 384 experts, 48 local, top-8, H 6144, I 2048.
MIMO = {"hidden": 6144, "inter": 2048, "n_experts": 384, "n_local": 48, "top_k": 8}
DECODE_T = (1, 2, 4, 8, 16)


def configs_for_plan(ts: tuple[int, ...] = DECODE_T) -> list[Config]:
    m = MIMO
    return [Config(t, m["hidden"], m["inter"], m["n_experts"], m["n_local"], m["top_k"]) for t in ts]
