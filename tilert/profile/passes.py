"""Per-pass compile time and IR size, through the compiler's own pass list (passes/manager.py).

Each pass is wrapped so the manager still times it (ctx.timings) and verifies after it, while we
keep a reference to its output graphs; sizes (node count, bytes of IR text) are measured after
the run, so the text rendering never counts as compile time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tilert.ir.graph import Graph
from tilert.passes.manager import PIPELINE, Pass, run_passes


@dataclass
class PassRow:
    step: str
    index: int
    name: str
    seconds: float
    graphs: int
    nodes: int  # summed over rank graphs
    ir_bytes: int  # bytes of to_text(), summed over rank graphs


def compile_with_profile(
    graph: Graph, ctx: Any, step: str, log: Callable[[str], None] | None = None
) -> tuple[list[Graph], list[PassRow]]:
    """Run the whole pipeline on one step graph; returns the rank graphs and one row per pass."""
    outputs: dict[str, list[Graph]] = {}

    def wrap(p: Pass) -> Pass:
        def fn(g: Graph, c: Any) -> Graph | list[Graph]:
            res = p.fn(g, c)
            outputs.setdefault(p.name, []).extend(res if isinstance(res, list) else [res])
            return res

        return Pass(p.name, fn, p.rewrites)

    n0 = len(ctx.timings)
    ctx.log = log
    graphs = run_passes(graph, ctx, [wrap(p) for p in PIPELINE])
    rows = [PassRow(step, 0, "input", 0.0, 1, len(graph.nodes), len(graph.to_text()))]
    for k, (name, secs) in enumerate(ctx.timings[n0:], 1):
        gs = outputs.get(name, [])
        rows.append(PassRow(step, k, name, secs, len(gs), sum(len(g.nodes) for g in gs),
                            sum(len(g.to_text()) for g in gs)))  # fmt: skip
    return graphs, rows


def format_pass_table(rows: list[PassRow]) -> str:
    out = [f"{'step':<10} {'#':>2} {'pass':<15} {'ms':>9} {'graphs':>6} {'nodes':>8} {'IR bytes':>11}"]
    for r in rows:
        ms = r.seconds * 1e3
        out.append(f"{r.step:<10} {r.index:>2} {r.name:<15} {ms:>9.1f} {r.graphs:>6} {r.nodes:>8} {r.ir_bytes:>11}")
    return "\n".join(out)
