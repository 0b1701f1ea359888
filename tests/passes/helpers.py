"""Shared runners for pass tests: compile step graphs stage by stage and execute them on simulated ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tilert.abi import OPCODES, TASK_FIELDS, WAITS
from tilert.ir.graph import Graph
from tilert.models.binding import bind_params
from tilert.models.builder import build_step_graph
from tilert.passes.manager import PIPELINE, PassContext, run_passes
from tilert.runtime.reference import ReferenceExecutor

GRAPH_PASSES = [p for p in PIPELINE if p.rewrites]


def stages(g: Graph, world: int) -> dict[str, list[Graph]]:
    """The rank graphs after every rewriting pass, by pass name."""
    out, graphs = {}, [g]
    ctx = PassContext(world=world, max_seq=g.meta.get("max_seq", 64))
    for p in GRAPH_PASSES:
        graphs = [x for gr in graphs for x in run_passes(gr, ctx, [p])]
        out[p.name] = graphs
    return out


def run_steps(steps: list[tuple[list[Graph], dict[str, Any]]], weights: dict, cache: list[dict] | None = None) -> list:
    """Run (rank graphs, inputs) steps in order on one executor (state carries over)."""
    world = len(steps[0][0])
    cache = cache if cache is not None else [{} for _ in range(world)]
    for graphs, _ in steps:
        for r, g in enumerate(graphs):
            bind_params(g, weights, cache[r])
    ex = ReferenceExecutor(cache)
    return [ex.run(graphs, inputs)[0] for graphs, inputs in steps]


def two_steps(cfg: Any, block: int, max_seq: int = 32, seed: int = 0) -> tuple[Graph, Graph, list[dict]]:
    """A verify step over `block` tokens at 0..block-1, then a decode step at position block."""
    g1 = build_step_graph(cfg, tokens=block, max_seq=max_seq, mode="verify")
    g2 = build_step_graph(cfg, tokens=1, max_seq=max_seq, mode="decode")
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.vocab_size, (block + 1,), generator=gen, dtype=torch.int32)
    inputs = [
        {"tokens": toks[:block], "positions": torch.arange(block, dtype=torch.int32)},
        {"tokens": toks[block:], "positions": torch.tensor([block], dtype=torch.int32)},
    ]
    return g1, g2, inputs


def assert_same(ref: dict, out: dict, where: str, rel: float = 1e-5) -> None:
    """Logits/features to `rel` of their scale; ids equal where the reference's top-2 margin allows."""
    for k, a in ref.items():
        b = out[k]
        assert tuple(a.shape) == tuple(b.shape), f"{where}: {k} shape {tuple(b.shape)} != {tuple(a.shape)}"
        if a.dtype.is_floating_point:
            scale = a.float().abs().max().clamp_min(1e-6)
            err = ((a.float() - b.float()).abs().max() / scale).item()
            assert err <= rel, f"{where}: {k} max rel err {err:.2e} > {rel}"
    lg = ref["logits"].float()
    top2 = lg.topk(2, dim=-1).values
    clear = bool(((top2[:, 0] - top2[:, 1]) > 1e-4 * lg.abs().max()).all())
    if clear:
        assert torch.equal(ref["next_tokens"].long(), out["next_tokens"].long()), f"{where}: next_tokens differ"
        if "accept" in ref:
            assert torch.equal(ref["accept"].long(), out["accept"].long()), f"{where}: accept differs"


def run_counter_vm(table: np.ndarray, expected: np.ndarray) -> tuple[int, np.ndarray]:
    """Execute per-SM queues as the persistent kernel would (round robin over SMs, a task runs once
    its waits are met): (tasks that ran, final counters). A deadlock leaves tasks unrun."""
    f = {name: i for i, name in enumerate(TASK_FIELDS)}
    counters = np.zeros_like(expected)
    pos = [0] * table.shape[0]
    ran, progress = 0, True
    while progress:
        progress = False
        for sm in range(table.shape[0]):
            while pos[sm] < table.shape[1] and table[sm, pos[sm], f["opcode"]] != OPCODES["NOP"]:
                row = table[sm, pos[sm]]
                ok = all(
                    row[f[f"wait{w}_counter"]] < 0
                    or (counters[row[f[f"wait{w}_counter"]] : row[f[f"wait{w}_counter"]] + row[f[f"wait{w}_count"]]]
                        >= row[f[f"wait{w}_expected"]]).all()
                    for w in range(WAITS)
                )  # fmt: skip
                if not ok:
                    break
                counters[row[f["signal"]]] += 1
                pos[sm] += 1
                ran += 1
                progress = True
    return ran, counters
