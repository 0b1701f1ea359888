"""Plan VM: a compiled step's task tables executed tile by tile on the CPU (torch tile bodies).

The counter VM in tests/passes only shows a table cannot deadlock. This VM shows the table is
right for the data: every task runs the tile of node `op` at coordinates (c0, c1, c2) as the
compiler cut it, with the tile body of its task kind (tilert/runtime/kinds/: the kernels' own
geometry, the op references applied to the tile's slice), reading the node's input buffers and
writing its tile of the output buffers, in an adversarial but legal order (an SM moves only when
its head task's waits are met; which ready SM moves next is random or "consumers first").
Activation buffers and workspaces start as NaN (int buffers as INT_POISON) and the KV cache slots
from the step's first position on are NaN too, so a task that runs before data it reads was
written computes NaN or a wrong value, and the step's outputs differ from the reference executor's.
Generic tasks (`OP_<KIND>`, a kind without its own tiles) run the kind's reference on their block
of output columns.

Ranks are simulated: the N rank tables run interleaved in one loop. A collective task (its task
kind says which: ALL_REDUCE, ALL_GATHER, MOE_REDUCE of a reducing node, LM_HEAD_ARGMAX/ACCEPT with
world > 1, collective generic kinds) first *arrives* (its waits met, it publishes a copy of its
local tile: a peer-memory push), then blocks its SM until every rank has arrived at the same (op,
stage, coords), and then combines the copies.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tilert.abi import FIELD, OPCODE_NAMES, OPCODES, WAITS
from tilert.ir.graph import Graph, IRError, Node
from tilert.ir.opset.fused import PeerValues
from tilert.ir.registry import get_op
from tilert.kernels.elementwise import GENERIC_COLS
from tilert.runtime.kinds import for_opcode
from tilert.runtime.persistent.vm_rank import INT_POISON, PlanVMError, VMRank, column_block

ELEMENTWISE = ("add", "scale")  # generic kinds whose column block reads the same columns of its inputs


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
        self.ranks: list[VMRank] = []
        self._deq: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]  # dequantised params per rank
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
        # cache slots from the step's first position on are not valid yet (a drafter step: its first
        # context or block position)
        firsts = [int(env[v.name].min()) for v in g.by_role("input") if v.name.endswith("positions")]
        if firsts:
            for v in g.by_role("state"):
                if len(v.shape) == 3:
                    env[v.name][:, min(firsts):] = float("nan")
            if "slots" in env:  # a mixed step: each sequence's slot from its own first position on
                pos, sl = env["positions"].long(), env["slots"].long()
                for u in sorted(set(sl.tolist())):
                    first = int(pos[sl == u].min())
                    for v in g.by_role("state"):
                        if len(v.shape) == 4:
                            env[v.name][u, :, first:] = float("nan")
        rk.env, rk.ws = env, {}

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
        sms = self.sms or int(np.asarray(tables[0]).shape[0])
        self.ranks = []
        for r, (g, t) in enumerate(zip(graphs, tables)):
            t = np.asarray(t)
            rows = [[list(map(int, row)) for row in q if row[FIELD["opcode"]] != OPCODES["NOP"]] for q in t.tolist()]
            n = 1 + max([-1] + [x for q in rows for row in q for x in self._counters_of(row)])
            rec = self.counters[r].setdefault(hash((t.shape, t.tobytes())), [np.zeros(n, np.int64), 0])
            rec[1] += 1  # this table's epoch
            self.ranks.append(VMRank(r, self.world, sms, g, rows, self._deq[r], counters=rec[0], epoch=rec[1]))
            self._bind(r, per_rank[r], buffers[r] if buffers else None)
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
                stuck = [(r, s, OPCODE_NAMES.get(self.ranks[r].rows[s][pc[r][s]][0])) for r, s in live[:8]]
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
            if self._collective(r, row):
                key = self._key(row)
                if (r, s) not in waiting:
                    arrived.setdefault(key, {})[r] = self._arrive(r, row)
                    waiting.add((r, s))
                    if len(arrived[key]) < self.world:
                        continue
                waiting.discard((r, s))
                self._complete(r, row, [arrived[key][q] for q in range(self.world)])
            else:
                self._body(r, row)
            if row[FIELD["signal"]] >= 0:
                self.ranks[r].counters[row[FIELD["signal"]]] += 1
            self.order.append((r, s, row))
            pc[r][s] += 1
            if pc[r][s] == len(self.ranks[r].rows[s]):
                live.remove((r, s))

    @staticmethod
    def _key(row: list[int]) -> tuple:
        return tuple(row[FIELD["opcode"] : FIELD["c2"] + 1])

    # ---- dispatch: the opcode's task kind, or a generic task ---------------------------------------

    def _task(self, r: int, row: list[int]) -> tuple[str, int, Node, list[Any], tuple[int, int, int]]:
        """(opcode, node index, node, its input buffers, coordinates) of a row of rank r."""
        rk = self.ranks[r]
        i = row[FIELD["op"]]
        if not 0 <= i < len(rk.graph.nodes):
            raise PlanVMError(f"task names node {i}; the rank graph has {len(rk.graph.nodes)}")
        n = rk.graph.nodes[i]
        name = OPCODE_NAMES.get(row[FIELD["opcode"]], "?")
        kind = for_opcode(name)
        if kind is not None and n.op not in kind.kinds:
            raise PlanVMError(f"opcode {name} on a '{n.op}' node")
        return name, i, n, [rk.env[x] for x in n.inputs], (row[FIELD["c0"]], row[FIELD["c1"]], row[FIELD["c2"]])

    def _collective(self, r: int, row: list[int]) -> bool:
        name, _, n, _, _ = self._task(r, row)
        kind = for_opcode(name)
        if kind is not None:
            return kind.collective(n, name)
        return name.startswith("OP_") and get_op(n.op).collective

    def _body(self, r: int, row: list[int]) -> None:
        name, i, n, ins, c = self._task(r, row)
        if name == "BARRIER":
            return
        kind = for_opcode(name)
        if kind is not None:
            return kind.tile(self.ranks[r], name, i, n, ins, c)
        if name.startswith("OP_"):
            return self._generic(r, n, ins, c, None)
        raise PlanVMError(f"no tile body for opcode {name} (node {n.op})")

    def _arrive(self, r: int, row: list[int]) -> Any:
        name, i, n, ins, c = self._task(r, row)
        kind = for_opcode(name)
        if kind is not None:
            return kind.arrive(self.ranks[r], name, i, n, ins, c)
        return [x.clone() if isinstance(x, torch.Tensor) else x for x in ins]  # a generic collective's inputs

    def _complete(self, r: int, row: list[int], parts: list[Any]) -> None:
        name, i, n, ins, c = self._task(r, row)
        kind = for_opcode(name)
        if kind is not None:
            return kind.complete(self.ranks[r], name, i, n, ins, c, parts)
        self._generic(r, n, ins, c, parts)

    # ---- generic kinds: one task per block of output columns ----------------------------------------

    def _generic(self, r: int, n: Node, ins: list[Any], c: tuple[int, int, int], parts: list[Any] | None) -> None:
        rk = self.ranks[r]
        outs = [rk.env[o] for o in n.outputs]
        W = outs[0].shape[-1] if outs[0].dim() else 1
        lo, hi = column_block(n, c, GENERIC_COLS, W)
        ew = n.op in ELEMENTWISE or (n.op == "silu_mul" and len(n.inputs) == 2)
        args = [x[..., lo:hi] if ew and x.shape[-1] == W else x for x in ins]
        ctx: Any = rk.ctx() if parts is None else PeerValues(r, self.world, *zip(*parts))
        try:
            res = get_op(n.op).reference(ctx, *args, **n.a.kwargs())
        except KeyError as e:
            raise IRError(f"{n.op}: {e}") from None
        for o, y in zip(outs, res):
            if o.dim() == 0:
                o[...] = y
            elif ew:
                o[..., lo:hi] = y
            else:
                o[..., lo : min(hi, o.shape[-1])] = y[..., lo : min(hi, o.shape[-1])]



__all__ = ["INT_POISON", "PlanVM", "PlanVMError"]
