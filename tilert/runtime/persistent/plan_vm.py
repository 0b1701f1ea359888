"""Plan VM: a compiled step's task tables executed tile by tile on the CPU (torch tile bodies).

The counter VM in tests/passes only shows a table cannot deadlock. This VM shows the table is
right for the data: every task runs the tile of node `op` at coordinates (c0, c1, c2) as
passes/tile.py defines them, reading the node's input buffers and writing its tile of the output
buffers, in an adversarial but legal order (an SM moves only when its head task's waits are met;
which ready SM moves next is random or "consumers first"). Activation buffers and workspaces
start as NaN (int buffers as INT32_MIN) and the KV cache slots from the step's first position on
are NaN too, so a task that runs before data it reads was written computes NaN or a wrong value,
and the step's outputs differ from the reference executor's.

Tile bodies apply the op references (tilert.ops and `get_op(kind).reference`) to the tile's slice;
the only math here that is not a reference call is the split-KV decomposition of attention
(per-split softmax partial with its log-sum-exp, and their merge with the sink), as the TileLang
`attn_split_body` / `combine_body` do it. Split-K GEMM tiles add into a zeroed fp32 workspace (the
GPU's atomics) and store the running sum to the output tile. The fused MoE runs at the kernel's
coordinates (`tilert.kernels.moe.tiling`) on the kernel's buffers (L, Idx, Wt, TokW, List, Count,
Hb, Y), poisoned like activations: the routers zero Y, the down tasks add into it.

Ranks are simulated: the N rank tables run interleaved in one loop. A collective task (ALL_REDUCE,
ALL_GATHER, MOE_REDUCE of a reducing node, LM_HEAD_ARGMAX/ACCEPT with world > 1, collective
generic kinds) first *arrives* (its waits met, it publishes a copy of its local tile: a peer-memory
push), then blocks its SM until every rank has arrived at the same (op, stage, coords), and then
combines the copies.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tilert import ops
from tilert.ir.graph import Graph, IRError
from tilert.ir.opset.fused import MOE_CORE, PeerValues, split_extras
from tilert.ir.registry import get_op
from tilert.kernels import moe
from tilert.kernels.attention import PERSISTENT_MIN_TILES
from tilert.ops.attention import visible as attention_visible
from tilert.ops.qtensor import QTensor
from tilert.passes.tile import TILE_CONFIG, attention_tiling, cdiv, gemm_shape, uses_gemv
from tilert.plan import FIELD, OPCODES, WAITS

NAMES = {v: k for k, v in OPCODES.items()}
INT_POISON = torch.iinfo(torch.int32).min
COLLECTIVE = {"ALL_REDUCE", "ALL_GATHER", "MOE_REDUCE"}
ELEMENTWISE = ("add", "scale")


class PlanVMError(RuntimeError):
    """The tables deadlock, or a row names something the VM cannot run."""


def ref(kind: str) -> Any:
    return get_op(kind).reference


@dataclass
class _Rank:
    graph: Graph
    rows: list[list[list[int]]]  # per SM: non-NOP rows in queue order
    env: dict[str, Any] = field(default_factory=dict)
    ws: dict[int, dict[str, Any]] = field(default_factory=dict)  # per node: workspaces
    counters: np.ndarray | None = None
    epoch: int = 1


def _is_int(v: Any) -> bool:
    return v.dtype.name.startswith(("i", "u"))


class PlanVM:
    """Runs N rank graphs' task tables step by step; params per rank, KV state kept in float32.

    policy: "random" (a random ready SM moves next) or "consumers" (the ready head task of the
    latest node, and of its latest stage, moves next: a consumer whose wait is missing runs before
    its producer).
    """

    def __init__(self, params: Sequence[Mapping[str, Any]] | Mapping[str, Any], sms: int | None = None,
                 policy: str = "random", seed: int = 0) -> None:  # fmt: skip
        if policy not in ("random", "consumers"):
            raise ValueError(f"unknown policy '{policy}' (random | consumers)")
        self.params = [dict(params)] if isinstance(params, Mapping) else [dict(p) for p in params]
        self.world = len(self.params)
        self.sms = sms
        self.policy, self.rng = policy, random.Random(seed)
        self.states: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        self.counters: list[dict[int, list[Any]]] = [{} for _ in range(self.world)]  # table -> [counters, epoch]
        self.ranks: list[_Rank] = []
        self.sms_now = sms or 0
        self._deq: dict[tuple[int, str], torch.Tensor] = {}
        self.order: list[tuple[int, int, list[int]]] = []  # (rank, sm, row) in the order tasks completed

    # ---- buffers ---------------------------------------------------------------------------------

    def _bind(self, r: int, inputs: Mapping[str, Any], buffers: Mapping[str, Sequence[int]] | None) -> None:
        rk, g = self.ranks[r], self.ranks[r].graph
        env: dict[str, Any] = {}
        for v in g.by_role("input"):
            if v.name not in inputs:
                raise ValueError(f"graph '{g.name}' needs input '{v.name}'")
            env[v.name] = torch.as_tensor(inputs[v.name])
        for v in g.by_role("param"):
            env[v.name] = self.params[r][v.name]
        st = self.states[r]
        for v in g.by_role("state"):
            if v.name not in st:
                st[v.name] = torch.zeros(v.shape, dtype=torch.float32)
            env[v.name] = st[v.name]
        for n in g.nodes:  # in-place outputs alias the state they update
            muts = get_op(n.op).mutates or ()
            for j, i in enumerate(muts):
                env[n.outputs[j + len(n.outputs) - len(muts)]] = env[n.inputs[i]]
        if buffers:  # float activations share storage as the memory plan shares buffers (byte offsets)
            arena = torch.full((max(o + n for o, n in buffers.values()),), float("nan"))
            for v in g.by_role("act"):
                if v.name not in env and v.name in buffers and not _is_int(v):
                    o = buffers[v.name][0]
                    env[v.name] = arena[o : o + math.prod(v.shape)].view(v.shape)
        for v in g.by_role("act"):
            if v.name not in env:
                env[v.name] = (torch.full(v.shape, INT_POISON, dtype=torch.int32) if _is_int(v)
                               else torch.full(v.shape, float("nan")))  # fmt: skip
        if "positions" in env:  # cache slots from the step's first position on are not valid yet
            start = int(env["positions"].min())
            for v in g.by_role("state"):
                if len(v.shape) == 3:
                    env[v.name][:, start:] = float("nan")
        rk.env, rk.ws = env, {}

    def _weight(self, r: int, name: str) -> torch.Tensor:
        key = (r, name)
        if key not in self._deq:
            w = self.ranks[r].env[name]
            self._deq[key] = (ref("dequant")(None, w)[0] if isinstance(w, QTensor) else w).float()
        return self._deq[key]

    def _ctx(self, r: int) -> PeerValues:
        return PeerValues(r, self.world)

    # ---- the step --------------------------------------------------------------------------------

    def step(self, graphs: Sequence[Graph], tables: Sequence[np.ndarray],
             inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
             buffers: Sequence[Mapping[str, Sequence[int]]] | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """One step: rank r runs tables[r] for graphs[r] (same inputs everywhere unless one mapping per
        rank); KV state carries over from earlier steps. Returns each rank's graph outputs by name.

        buffers (per rank: activation -> (byte offset, nbytes), the memory plan's) makes float
        activations that share a buffer share storage (element i of the arena stands for byte i), so
        a buffer reused while a reader of its earlier value still runs shows up as a wrong value.

        Counters are kept per table and compared with epoch x expected (epoch = how many times that
        table ran), as the persistent kernel does without resetting them."""
        if not len(graphs) == len(tables) == self.world:
            raise ValueError(f"{len(graphs)} graphs and {len(tables)} tables for {self.world} ranks")
        per_rank = [inputs] * self.world if isinstance(inputs, Mapping) else list(inputs)
        self.ranks = []
        for r, (g, t) in enumerate(zip(graphs, tables)):
            t = np.asarray(t)
            rows = [[list(map(int, row)) for row in q if row[FIELD["opcode"]] != OPCODES["NOP"]] for q in t.tolist()]
            n = 1 + max([-1] + [x for q in rows for row in q for x in self._counters_of(row)])
            rec = self.counters[r].setdefault(hash((t.shape, t.tobytes())), [np.zeros(n, np.int64), 0])
            rec[1] += 1  # this table's epoch
            self.ranks.append(_Rank(g, rows, counters=rec[0], epoch=rec[1]))
            self._bind(r, per_rank[r], buffers[r] if buffers else None)
        self.sms_now = self.sms or int(np.asarray(tables[0]).shape[0])
        self._run()
        return [{o: rk.env[o].clone() for o in rk.graph.outputs} for rk in self.ranks]

    @staticmethod
    def _counters_of(row: list[int]) -> list[int]:
        out = [row[FIELD["signal"]]]
        for i in range(WAITS):
            c, n = row[FIELD[f"wait{i}_counter"]], row[FIELD[f"wait{i}_count"]]
            if c >= 0:
                out.append(c + n - 1)
        return out

    def _ready(self, r: int, row: list[int]) -> bool:
        cnt, epoch = self.ranks[r].counters, self.ranks[r].epoch
        for i in range(WAITS):
            c, n, e = (row[FIELD[f"wait{i}_{k}"]] for k in ("counter", "count", "expected"))
            if c >= 0 and (cnt[c : c + n] < e * epoch).any():
                return False
        return True

    def _collective(self, r: int, name: str, row: list[int]) -> bool:
        node = self.ranks[r].graph.nodes[row[FIELD["op"]]]
        if name == "MOE_REDUCE":  # an all-reduce only when the node has one
            return bool(node.a.get("reduce")) and int(node.a.get("world", 1)) > 1
        if name in COLLECTIVE:
            return True
        if name in ("LM_HEAD_ARGMAX", "LM_HEAD_ACCEPT"):
            return int(node.a.get("world", 1)) > 1
        return name.startswith("OP_") and get_op(node.op).collective

    def _run(self) -> None:
        pc = [[0] * len(rk.rows) for rk in self.ranks]
        arrived: dict[tuple, dict[int, Any]] = {}  # (op, opcode, coords) -> rank -> published tile
        waiting: set[tuple[int, int]] = set()  # (rank, sm) that arrived at a collective
        live = [(r, s) for r, rk in enumerate(self.ranks) for s in range(len(rk.rows)) if rk.rows[s]]
        while live:
            ready = []
            for r, s in live:
                row = self.ranks[r].rows[s][pc[r][s]]
                if (r, s) in waiting:
                    if len(arrived[self._key(row)]) == self.world:
                        ready.append((r, s))
                elif self._ready(r, row):
                    ready.append((r, s))
            if not ready:
                stuck = [(r, s, NAMES.get(self.ranks[r].rows[s][pc[r][s]][0])) for r, s in live[:8]]
                epoch = self.ranks[0].epoch
                raise PlanVMError(f"task tables deadlock at epoch {epoch}: blocked (rank, sm, task) {stuck}")
            if self.policy == "random":
                r, s = self.rng.choice(ready)
            else:
                def stage(x: tuple[int, int]) -> tuple[int, int]:  # (node, opcode): opcodes follow stage order
                    row = self.ranks[x[0]].rows[x[1]][pc[x[0]][x[1]]]
                    return row[FIELD["op"]], row[FIELD["opcode"]]

                top = max(stage(x) for x in ready)
                r, s = self.rng.choice([x for x in ready if stage(x) == top])
            row = self.ranks[r].rows[s][pc[r][s]]
            name = NAMES.get(row[FIELD["opcode"]], "?")
            if self._collective(r, name, row):
                key = self._key(row)
                if (r, s) not in waiting:
                    arrived.setdefault(key, {})[r] = self._arrive(r, name, row)
                    waiting.add((r, s))
                    if len(arrived[key]) < self.world:
                        continue
                waiting.discard((r, s))
                self._complete(r, name, row, [arrived[key][q] for q in range(self.world)])
            else:
                self._body(r, name, row)
            if row[FIELD["signal"]] >= 0:
                self.ranks[r].counters[row[FIELD["signal"]]] += 1
            self.order.append((r, s, row))
            pc[r][s] += 1
            if pc[r][s] == len(self.ranks[r].rows[s]):
                live.remove((r, s))

    @staticmethod
    def _key(row: list[int]) -> tuple:
        return tuple(row[FIELD["opcode"] : FIELD["c2"] + 1])

    # ---- dispatch --------------------------------------------------------------------------------

    def _node(self, r: int, row: list[int]) -> tuple[Any, list[Any], tuple[int, int, int]]:
        rk = self.ranks[r]
        i = row[FIELD["op"]]
        if not 0 <= i < len(rk.graph.nodes):
            raise PlanVMError(f"task names node {i}; the rank graph has {len(rk.graph.nodes)}")
        n = rk.graph.nodes[i]
        return n, [rk.env[x] for x in n.inputs], (row[FIELD["c0"]], row[FIELD["c1"]], row[FIELD["c2"]])

    def _expect(self, name: str, n: Any, kinds: tuple[str, ...]) -> None:
        if not n.op.startswith(kinds):
            raise PlanVMError(f"opcode {name} on a '{n.op}' node")

    def _body(self, r: int, name: str, row: list[int]) -> None:
        n, ins, c = self._node(r, row)
        if name == "BARRIER":
            return
        if name.startswith("LINEAR_") or name == "LM_HEAD_GEMM":
            self._expect(name, n, ("linear_", "lm_head_"))
            return self._gemm(r, row[FIELD["op"]], n, ins, c)
        if name in ("ATTN_SPLIT", "ATTN_COMBINE"):
            self._expect(name, n, ("attention_block",))
            return (self._attn_split if name == "ATTN_SPLIT" else self._attn_combine)(r, row[FIELD["op"]], n, ins, c)
        if name in ("MOE_ROUTER", "MOE_TOPK", "MOE_GATE_UP", "MOE_DOWN"):
            self._expect(name, n, ("fused_moe_",))
            return getattr(self, "_" + name.lower())(r, row[FIELD["op"]], n, ins, c)
        if name in ("LM_HEAD_ARGMAX", "LM_HEAD_ACCEPT", "MOE_REDUCE"):  # no all-reduce: no peers to wait for
            if name == "MOE_REDUCE":
                self._expect(name, n, ("fused_moe_",))
            return self._complete(r, name, row, [self._arrive(r, name, row)])
        if name.startswith("OP_"):
            return self._generic(r, n, ins, c, None)
        raise PlanVMError(f"no tile body for opcode {name} (node {n.op})")

    def _arrive(self, r: int, name: str, row: list[int]) -> Any:
        n, ins, c = self._node(r, row)
        if name == "ALL_REDUCE":
            lo, hi = self._cols(n, c, TILE_CONFIG["collective"]["cols"], self.ranks[r].env[n.outputs[0]])
            return ins[0][..., lo:hi].float().clone()
        if name == "ALL_GATHER":
            cols = TILE_CONFIG["collective"]["cols"]
            return ins[0][..., c[0] * cols : (c[0] + 1) * cols].clone()
        if name == "MOE_REDUCE":
            lo, hi = self._cols(n, c, TILE_CONFIG["collective"]["cols"], self.ranks[r].env[n.outputs[0]])
            return self._moe_ws(r, row[FIELD["op"]], n, ins)["Y"][:, lo:hi].clone()
        if name in ("LM_HEAD_ARGMAX", "LM_HEAD_ACCEPT"):
            logits = self.ranks[r].env[n.outputs[0]]
            if int(n.a.get("world", 1)) == 1:
                return ref("argmax")(self._ctx(r), logits)[0]
            vloc, vocab = logits.shape[-1], n.a["vocab_size"]
            v, i = ref("vocab_argmax")(self._ctx(r), logits, vocab_offset=r * vloc,
                                       vocab_valid=min(vloc, vocab - r * vloc))  # fmt: skip
            return v.clone(), i.clone()
        if name.startswith("OP_"):
            return [x.clone() if isinstance(x, torch.Tensor) else x for x in ins]
        raise PlanVMError(f"opcode {name} is not a collective")

    def _complete(self, r: int, name: str, row: list[int], parts: list[Any]) -> None:
        n, ins, c = self._node(r, row)
        env, ctx = self.ranks[r].env, self._ctx(r)
        out = env[n.outputs[0]]
        if name in ("ALL_REDUCE", "MOE_REDUCE"):
            lo, hi = self._cols(n, c, TILE_CONFIG["collective"]["cols"], out)
            y = ref("all_reduce")(PeerValues(r, self.world, parts), parts[r])[0] if len(parts) > 1 else parts[0]
            res = None
            if name == "ALL_REDUCE" and n.op == "all_reduce_residual":
                res = ins[1]
            elif name == "MOE_REDUCE" and n.a.get("residual"):
                res = ins[-1]
            if res is not None:
                y = ref("add")(ctx, res[..., lo:hi], y)[0]
            out[..., lo:hi] = y
        elif name == "ALL_GATHER":
            d = n.a["dim"] % out.dim()
            if d != out.dim() - 1:
                raise PlanVMError(f"all_gather along dim {n.a['dim']} of {list(out.shape)}: only the last dim")
            W, cols = ins[0].shape[-1], TILE_CONFIG["collective"]["cols"]
            lo, hi = c[0] * cols, min(W, (c[0] + 1) * cols)
            for q, p in enumerate(parts):
                out[..., q * W + lo : q * W + hi] = p
        elif name in ("LM_HEAD_ARGMAX", "LM_HEAD_ACCEPT"):
            if int(n.a.get("world", 1)) == 1:
                nxt = parts[0]
            else:
                vals, ids = [p[0] for p in parts], [p[1] for p in parts]
                nxt = ref("argmax_reduce")(PeerValues(r, self.world, vals, ids), vals[r], ids[r])[0]
            env[n.outputs[1]][...] = nxt
            if name == "LM_HEAD_ACCEPT":
                env[n.outputs[2]][...] = ref("dflash_accept")(ctx, ins[2], nxt)[0]
        elif name.startswith("OP_"):
            self._generic(r, n, ins, c, parts)
        else:
            raise PlanVMError(f"opcode {name} is not a collective")

    @staticmethod
    def _cols(n: Any, c: tuple[int, int, int], cols: int, out: torch.Tensor) -> tuple[int, int]:
        W = out.shape[-1]
        if c[0] * cols >= W:
            raise PlanVMError(f"{n.op} column block {c[0]} past width {W}")
        return c[0] * cols, min(W, (c[0] + 1) * cols)

    def _ws(self, r: int, i: int) -> dict[str, Any]:
        return self.ranks[r].ws.setdefault(i, {})

    # ---- GEMM tiles: LINEAR_*, LM_HEAD_GEMM -------------------------------------------------------

    def _gemm(self, r: int, i: int, n: Any, ins: list[Any], c: tuple[int, int, int]) -> None:
        x, out = ins[0], self.ranks[r].env[n.outputs[0]]
        w = self._weight(r, n.inputs[1])
        M, K, N = math.prod(x.shape[:-1]), x.shape[-1], w.shape[0]
        bm, bn, _, split = gemm_shape(M, N, K, self.sms_now, uses_gemv(n.op, M, K))
        nt, mt, s = c
        if not (nt * bn < N and mt * bm < M and s < split):
            raise PlanVMError(f"{n.op} tile {c} outside ({cdiv(N, bn)}, {cdiv(M, bm)}, {split})")
        rows, cols = slice(mt * bm, min(M, (mt + 1) * bm)), slice(nt * bn, min(N, (nt + 1) * bn))
        kc = K // split
        ks = slice(s * kc, (s + 1) * kc)
        ctx = self._ctx(r)
        eps = n.a.get("norm_eps")
        norm_w, res = split_extras(tuple(ins[3 if n.op == "lm_head_accept" else 2 :]), eps, bool(n.a.get("residual")))
        xr = x.reshape(M, K)[rows]
        if norm_w is not None:
            xr = ref("rms_norm")(ctx, xr, norm_w, eps=eps)[0]  # the prologue needs whole rows
        y = ref("matmul")(ctx, xr[:, ks], w[cols, ks])[0]
        if res is not None and s == 0:
            y = ref("add")(ctx, res.reshape(M, N)[rows, cols], y)[0]
        o2 = out.view(M, N)
        if split == 1:
            o2[rows, cols] = y
            return
        acc = self._ws(r, i).setdefault("acc", torch.zeros(M, N))
        acc[rows, cols] += y
        o2[rows, cols] = acc[rows, cols]

    # ---- attention: ATTN_SPLIT (h, row block, split), ATTN_COMBINE (h, row, 0) ----------------------

    def _attn_geom(self, n: Any, ins: list[Any]) -> dict[str, Any]:
        a, q, kc = n.a, ins[0], ins[3]
        T, Hkv, H = q.shape[0], kc.shape[0], a["heads"]
        G = H // Hkv
        cfg = TILE_CONFIG["attention"]
        W = a.get("window") or 0
        rows, bm, NS = attention_tiling(a, T, Hkv)
        pos = ins[5]
        start = int(pos[0])
        lo = max(start - W + 1, 0) if W else 0  # the block's first row sees keys start-W+1 .. start
        BN = cfg["block_n"]
        tiles = cdiv(start - lo, BN)
        per = max(cdiv(tiles, NS), PERSISTENT_MIN_TILES)
        return dict(T=T, Hkv=Hkv, H=H, G=G, rows=rows, bm=bm, NS=NS, W=W, start=start, lo=lo, per=per, BN=BN,
                    n_used=cdiv(tiles, per), D=a["head_dim"], Dv=a["v_head_dim"])  # fmt: skip

    def _attn_ws(self, r: int, i: int, g: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws(r, i)
        if "o" not in ws:
            ws["o"] = torch.full((g["Hkv"], g["rows"], g["NS"] + 1, g["Dv"]), float("nan"))
            ws["lse"] = torch.full((g["Hkv"], g["rows"], g["NS"] + 1), float("nan"))
        return ws

    def _attn_split(self, r: int, i: int, n: Any, ins: list[Any], c: tuple[int, int, int]) -> None:
        a, g, ctx = n.a, self._attn_geom(n, ins), self._ctx(r)
        h, rb, s = c
        if not (h < g["Hkv"] and rb * g["bm"] < g["rows"] and s <= g["NS"]):
            raise PlanVMError(f"attention split tile {c} outside ({g['Hkv']}, {cdiv(g['rows'], g['bm'])}, {g['NS']})")
        q, k, v, kcache, vcache, pos = ins[:6]
        extra = ins[6:]
        G, D, Dv, T = g["G"], g["D"], g["Dv"], g["T"]
        eps = a.get("qk_norm_eps")
        norms = extra[int(bool(a.get("has_sink"))) :] if eps is not None else ()
        rope = dict(head_dim=D, rope_dim=a["rope_dim"], theta=a["theta"])
        qh = q[:, h * G * D : (h + 1) * G * D]
        if eps is not None:
            qh = ref("head_rms_norm")(ctx, qh, norms[0], heads=G, eps=eps)[0]
        qh = ref("rope")(ctx, qh, pos, heads=G, **rope)[0].reshape(T * G, D)
        r0, r1 = rb * g["bm"], min(g["rows"], (rb + 1) * g["bm"])
        qr = qh[r0:r1]
        qpos = pos.long()[torch.arange(r0, r1) // G]
        if s < g["NS"]:
            if s >= g["n_used"]:
                return  # an unused split exits without writing
            s_lo = g["lo"] + s * g["per"] * g["BN"]
            s_hi = min(s_lo + g["per"] * g["BN"], g["start"])
            keys, vals, kpos = kcache[h, s_lo:s_hi], vcache[h, s_lo:s_hi], torch.arange(s_lo, s_hi)
        else:  # the new keys: rope on k, v scale, and (row block 0) the cache append
            kh = k[:, h * D : (h + 1) * D]
            if eps is not None:
                kh = ref("head_rms_norm")(ctx, kh, norms[1], heads=1, eps=eps)[0]
            kh = ref("rope")(ctx, kh, pos, heads=1, **rope)[0]
            vh = v[:, h * Dv : (h + 1) * Dv]
            if a.get("v_scale") is not None:
                vh = ref("scale")(ctx, vh, factor=a["v_scale"])[0]
            if rb == 0:
                ops.kv_append(kcache[h : h + 1], vcache[h : h + 1], kh.view(T, 1, D), vh.view(T, 1, Dv), pos)
            keys, vals, kpos = kh.float(), vh.float(), pos.long()
        o, lse = _split_partial(qr, qpos, keys, vals, kpos, a["scale"], g["W"], a.get("causal", True))
        ws = self._attn_ws(r, i, g)
        ws["o"][h, r0:r1, s] = o
        ws["lse"][h, r0:r1, s] = lse

    def _attn_combine(self, r: int, i: int, n: Any, ins: list[Any], c: tuple[int, int, int]) -> None:
        a, g = n.a, self._attn_geom(n, ins)
        h, row, _ = c
        if not (h < g["Hkv"] and row < g["rows"]):
            raise PlanVMError(f"attention combine tile {c} outside ({g['Hkv']}, {g['rows']})")
        ws = self._attn_ws(r, i, g)
        slots = [*range(g["n_used"]), g["NS"]]
        G, Dv = g["G"], g["Dv"]
        t, hq = row // G, h * G + row % G
        sink = ins[6][hq] if a.get("has_sink") else None
        out = self.ranks[r].env[n.outputs[0]]
        out[t, hq * Dv : (hq + 1) * Dv] = _merge(ws["o"][h, row, slots], ws["lse"][h, row, slots], sink)

    # ---- MoE: ROUTER (e_tile), TOPK, GATE_UP (task), DOWN (task), REDUCE ------------------------------

    def _moe_h(self, r: int, n: Any, ins: list[Any]) -> torch.Tensor:
        """x, or with a norm prologue (norm_eps) rms_norm(x): the router and gate/up tasks each
        normalise the whole rows they read (no extra task, no extra buffer)."""
        norm_w, _ = split_extras(tuple(ins[MOE_CORE:]), n.a.get("norm_eps"), bool(n.a.get("residual")))
        x = ins[0]
        return x.float() if norm_w is None else ref("rms_norm")(self._ctx(r), x, norm_w, eps=n.a["norm_eps"])[0]

    def _moe_geo(self, n: Any, ins: list[Any]) -> moe.MoeTiling:
        (T, H), In = ins[0].shape, ins[4].shape[2]
        return moe.tiling(T, H, In, n.a["n_local"], n.a["top_k"])

    def _moe_ws(self, r: int, i: int, n: Any, ins: list[Any]) -> dict[str, Any]:
        """The kernel's buffers (tilert/kernels/moe.py), poisoned: L [T, E] logits, Idx/Wt [T, k],
        TokW [E_local, max(TP, T)], List [E_local], Count [1], Hb [max_slots, T, In] (fp32 here, bf16
        on the GPU), Y [T, H] fp32 (zeroed by the router tasks, then the down tasks' atomics)."""
        ws = self._ws(r, i)
        if "L" not in ws:
            T, H = ins[0].shape
            E, k, EL, In = ins[1].shape[0], n.a["top_k"], n.a["n_local"], ins[4].shape[2]
            nan = float("nan")
            ws["L"] = torch.full((T, E), nan)
            ws["Idx"] = torch.full((T, k), INT_POISON, dtype=torch.int32)
            ws["Wt"] = torch.full((T, k), nan)
            ws["TokW"] = torch.full((EL, max(moe.TP, T)), nan)
            ws["List"] = torch.full((EL,), INT_POISON, dtype=torch.int32)
            ws["Count"] = torch.full((1,), INT_POISON, dtype=torch.int32)
            ws["Hb"] = torch.full((self._moe_geo(n, ins).max_slots, T, In), nan)
            ws["Y"] = torch.full((T, H), nan)
        return ws

    def _moe_router(self, r: int, i: int, n: Any, ins: list[Any], c: tuple[int, int, int]) -> None:
        """router_tile(e_tile): L[:, 4 experts] and the zeroing of this task's slice of Y."""
        ws, ctx = self._moe_ws(r, i, n, ins), self._ctx(r)
        E = ins[1].shape[0]
        if c[0] * moe.ROUTER_E >= E:
            raise PlanVMError(f"MoE router tile {c} outside ({cdiv(E, moe.ROUTER_E)})")
        rows = slice(c[0] * moe.ROUTER_E, min(E, (c[0] + 1) * moe.ROUTER_E))
        ws["L"][:, rows] = ref("matmul")(ctx, self._moe_h(r, n, ins), ins[1][rows], out_dtype="f32")[0]
        y = ws["Y"].view(-1)
        zper = cdiv(y.numel(), cdiv(E, moe.ROUTER_E))
        y[c[0] * zper : (c[0] + 1) * zper] = 0.0

    def _moe_topk(self, r: int, i: int, n: Any, ins: list[Any], c: tuple[int, int, int]) -> None:
        """route_body: Idx/Wt, TokW (a token's weight per local expert, 0 if not routed there), the
        active list List[0:Count] of local experts with >= 1 token, in increasing order."""
        ws, a = self._moe_ws(r, i, n, ins), n.a
        idx, wt = ops.route(ws["L"], ins[2], top_k=a["top_k"], n_group=a.get("n_group", 1),
                            topk_group=a.get("topk_group", 1), normalize=a.get("normalize", True),
                            scaling=a.get("scaling", 1.0))  # fmt: skip
        ws["Idx"][...], ws["Wt"][...] = idx, wt
        local = idx.long() - a.get("expert_offset", 0)
        mine = (local >= 0) & (local < a["n_local"])
        tok = torch.arange(idx.shape[0])[:, None].expand_as(idx)
        ws["TokW"].zero_()
        ws["TokW"][local[mine], tok[mine]] = wt[mine].float()
        act = torch.unique(local[mine])  # sorted
        ws["List"][: len(act)] = act.to(torch.int32)
        ws["Count"][0] = len(act)

    def _moe_count(self, ws: dict[str, Any], c: tuple[int, int, int]) -> int:
        """Count (active slots) as the top-k task wrote it; List[0:Count] are their local experts."""
        count = int(ws["Count"][0])
        if count == INT_POISON:
            raise PlanVMError(f"MoE expert task {c} ran before the top-k task wrote the active-expert list")
        return count

    def _moe_gate_up(self, r: int, i: int, n: Any, ins: list[Any], c: tuple[int, int, int]) -> None:
        """Gate/up task c[0]: its items (slot, n_tile) of the active slots (moe.MoeTiling.gu_items),
        each Hb[slot, :, gu_cols(n_tile)] = silu(g) * u for expert List[slot]."""
        ws, geo = self._moe_ws(r, i, n, ins), self._moe_geo(n, ins)
        if c[0] >= geo.gu_tasks or c[1] or c[2]:
            raise PlanVMError(f"MoE gate/up task {c} outside ({geo.gu_tasks}, 1, 1)")
        w = self._weight(r, n.inputs[3])  # [E_local, 2In, H]: gate rows, then up rows
        off = n.a.get("expert_offset", 0)
        x = self._moe_h(r, n, ins)
        for slot, nt in geo.gu_items(c[0], self._moe_count(ws, c)):
            e = int(ws["List"][slot])
            lo, hi = geo.gu_cols(nt)
            we = torch.cat([w[:, lo:hi], w[:, geo.inter + lo : geo.inter + hi]], dim=1)
            every = torch.full((x.shape[0], 1), e + off, dtype=torch.int32)  # every token through expert e
            ws["Hb"][slot, :, lo:hi] = ops.silu_mul(ops.expert_linear(x, we, every, expert_offset=off))[:, 0]

    def _moe_down(self, r: int, i: int, n: Any, ins: list[Any], c: tuple[int, int, int]) -> None:
        """Down task c[0]: its items (slot, n_tile, k split), each Y[:, down_cols] += (Hb[slot] @
        Wdown[e]^T) x TokW[e, t] (the GPU's fp32 atomics)."""
        ws, geo, a = self._moe_ws(r, i, n, ins), self._moe_geo(n, ins), n.a
        if c[0] >= geo.down_tasks or c[1] or c[2]:
            raise PlanVMError(f"MoE down task {c} outside ({geo.down_tasks}, 1, 1)")
        off, T = a.get("expert_offset", 0), geo.tokens
        wd = self._weight(r, n.inputs[4])
        for slot, j, q in geo.down_items(c[0], self._moe_count(ws, c)):
            e = int(ws["List"][slot])
            (lo, hi), (klo, khi) = geo.down_cols(j), geo.down_k(q)
            every = torch.full((T, 1), e + off, dtype=torch.int32)
            y = ops.expert_linear(ws["Hb"][slot][:, klo:khi], wd[:, lo:hi, klo:khi], every, expert_offset=off)
            tokw = ws["TokW"][e, :T, None]
            ws["Y"][:, lo:hi] += ops.moe_combine(y, tokw, every, expert_offset=off, n_local=a["n_local"])

    # ---- generic kinds: one task per block of output columns ----------------------------------------

    def _generic(self, r: int, n: Any, ins: list[Any], c: tuple[int, int, int], parts: list[Any] | None) -> None:
        env = self.ranks[r].env
        outs = [env[o] for o in n.outputs]
        W = outs[0].shape[-1] if outs[0].dim() else 1
        cols = TILE_CONFIG["generic"]["cols"]
        lo, hi = c[0] * cols, min(W, (c[0] + 1) * cols)
        if lo >= W:
            raise PlanVMError(f"{n.op} column block {c[0]} past width {W}")
        ew = n.op in ELEMENTWISE or (n.op == "silu_mul" and len(n.inputs) == 2)
        args = [x[..., lo:hi] if ew and x.shape[-1] == W else x for x in ins]
        ctx: Any = self._ctx(r) if parts is None else PeerValues(r, self.world, *zip(*parts))
        try:
            res = get_op(n.op).reference(ctx, *args, **n.a)
        except KeyError as e:
            raise IRError(f"{n.op}: {e}") from None
        for o, y in zip(outs, res):
            if o.dim() == 0:
                o[...] = y
            elif ew:
                o[..., lo:hi] = y
            else:
                o[..., lo : min(hi, o.shape[-1])] = y[..., lo : min(hi, o.shape[-1])]


def _split_partial(
    q: torch.Tensor, qpos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor,
    scale: float, window: int, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One split of flash-decoding: (softmax-normalised partial output, log-sum-exp) of rows q over
    keys k at positions kpos, with the mask of tilert.ops.attention; rows with no visible key give
    (0, -inf)."""
    s = (q.float() @ k.float().T) * scale
    s = s.masked_fill(~attention_visible(qpos, kpos, window, causal), float("-inf"))
    m = s.amax(-1, keepdim=True) if s.shape[1] else torch.full((s.shape[0], 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    o = torch.where(den > 0, (e @ v.float()) / den.clamp_min(1e-30), torch.zeros(()))
    lse = torch.where(den[:, 0] > 0, m[:, 0] + torch.log(den[:, 0].clamp_min(1e-30)), torch.tensor(float("-inf")))
    return o, lse


def _merge(o: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Combine split partials [S, Dv] with their log-sum-exps [S] and the sink logit (denominator only)."""
    m = lse.max()
    if sink is not None:
        m = torch.maximum(m, sink.float())
    m = torch.where(torch.isfinite(m), m, torch.zeros(()))
    w = torch.exp(lse - m)
    tot = w.sum() + (torch.exp(sink.float() - m) if sink is not None else 0.0)
    return (w[:, None] * o).sum(0) / tot


__all__ = ["PlanVM", "PlanVMError"]
