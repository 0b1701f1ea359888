"""Which params and states the shard pass splits, and how (DESIGN §4).

Decisions depend only on the graph's structure, never on the rank, so every rank runs the same
op sequence (SPMD). A `Split` gives each rank a [start, stop) range along one dim (stop may run
past the end: zero padding) or, for expert stacks, a range of experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilert.ir.graph import Graph, IRError, Node


class ShardError(ValueError):
    """The model cannot be split over the requested ranks; the message names the config field."""


@dataclass(frozen=True)
class Split:
    dim: int
    ranges: tuple[tuple[int, int], ...]  # per rank
    experts: bool = False


def even(n: int, world: int, unit: int = 1, pad: bool = False) -> tuple[tuple[int, int], ...]:
    """world equal ranges of n (in `unit`s); with pad the last ones may run past n."""
    per = -(-n // world) if pad else n // world
    return tuple((r * per * unit, (r + 1) * per * unit) for r in range(world))


class _Planner:
    def __init__(self, g: Graph, world: int) -> None:
        self.g, self.world = g, world
        self.prod = g.producers()
        self.cons = g.consumers()
        self.splits: dict[str, Split] = {}

    def node(self, value: str) -> Node | None:
        i = self.prod.get(value)
        return None if i is None else self.g.nodes[i]

    def set(self, name: str, split: Split) -> None:
        old = self.splits.get(name)
        if old is not None and old != split:
            raise IRError(f"shard: '{name}' would be split two different ways")
        self.splits[name] = split

    def weight(self, value: str, skip: tuple[str, ...] = ("rope", "head_rms_norm", "scale")) -> str:
        """The GEMM weight param behind `value` (through rope/norm/scale chains and a dequant)."""
        n = self.node(value)
        while n is not None and n.op in skip:
            n = self.node(n.inputs[0])
        if n is None or n.op != "matmul":
            raise IRError(f"shard: '{value}' is not produced by a GEMM")
        d = self.node(n.inputs[1])
        return d.inputs[0] if d is not None and d.op == "dequant" else n.inputs[1]

    def gemm_users(self, value: str) -> list[str]:
        """Weights of the GEMMs that read `value` as their x input."""
        out = []
        for i in self.cons.get(value, []):
            n = self.g.nodes[i]
            if n.op == "matmul" and n.inputs[0] == value:
                d = self.node(n.inputs[1])
                out.append(d.inputs[0] if d is not None and d.op == "dequant" else n.inputs[1])
        return out

    # ---- rules ------------------------------------------------------------------------------
    def attention(self, n: Node) -> None:
        a, N = n.a, self.world
        H, Hkv, D, Dv = a.heads, a.kv_heads, a.head_dim, a.v_head_dim
        pre = "dflash." if self.g.meta.get("kind") == "drafter" else ("swa_" if a.window else "")
        if H % N:
            raise ShardError(f"config field '{pre}num_attention_heads' = {H} does not split over {N} ranks")
        hq = H // N
        if Hkv % N == 0:
            kv = even(Hkv, N)
        elif N % Hkv == 0:  # each rank keeps the one kv head its q heads read
            kv = tuple(((r * hq) // (H // Hkv), (r * hq) // (H // Hkv) + 1) for r in range(N))
        else:
            raise ShardError(
                f"config field '{pre}num_key_value_heads' = {Hkv} neither divides nor is a multiple of {N} ranks"
            )
        q_rows = even(H, N, D)
        self.set(self.weight(n.inputs[0]), Split(0, q_rows))
        if a.has_sink:
            self.set(n.inputs[4], Split(0, even(H, N)))
        caches = [n.inputs[1], n.inputs[2]]
        while caches[0] in self.prod:  # walk back the kv_append chain to the state
            kv_node = self.node(caches[0])
            self.set(self.weight(kv_node.inputs[2]), Split(0, tuple((s * D, e * D) for s, e in kv)))
            self.set(self.weight(kv_node.inputs[3]), Split(0, tuple((s * Dv, e * Dv) for s, e in kv)))
            caches = [kv_node.inputs[0], kv_node.inputs[1]]
        for c in caches:  # split by kv heads: dim 0 of [Hkv, S, D], dim 1 of slotted [slots, Hkv, S, D]
            self.set(c, Split(len(self.g.values[c].shape) - 3, kv))
        for w in self.gemm_users(n.outputs[0]):
            self.set(w, Split(1, even(H, N, Dv)))

    def dense_mlp(self, n: Node) -> None:
        inter = self.g.values[n.inputs[0]].shape[-1]
        rows = even(inter, self.world, pad=True)
        for x in n.inputs:
            self.set(self.weight(x, skip=()), Split(0, rows))
        for w in self.gemm_users(n.outputs[0]):
            self.set(w, Split(1, rows))

    def lm_head(self, n: Node) -> None:
        V = self.g.values[n.inputs[0]].shape[-1]
        self.set(self.weight(n.inputs[0], skip=()), Split(0, even(V, self.world, pad=True)))

    def experts(self) -> None:
        for v in self.g.by_role("param"):
            src = v.src()
            if "experts" in src:
                E = src["count"]
                if E % self.world:
                    raise ShardError(f"config field 'n_routed_experts' = {E} does not split over {self.world} ranks")
                self.set(v.name, Split(0, even(E, self.world), experts=True))


def plan_splits(g: Graph, world: int) -> dict[str, Split]:
    """Per param/state name: how it is split over `world` ranks (absent = replicated)."""
    p = _Planner(g, world)
    for n in g.nodes:
        if n.op == "attention":
            p.attention(n)
        elif n.op == "silu_mul" and len(n.inputs) == 2:
            p.dense_mlp(n)
        elif n.op == "argmax":
            p.lm_head(n)
    p.experts()
    return p.splits
