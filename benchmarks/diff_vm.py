"""Every value of a multi-rank persistent step against the plan VM's, node by node (GPU).

The plan VM (runtime/persistent/plan_vm.py) runs the same rank graphs and task tables with the
op references on the CPU; a persistent kernel bug shows as the first node whose output leaves the
VM's (relative error > 5e-2, non-finite, or unequal integers), per rank. --runs rebuilds the
programs: a value that changes between runs is a race, one that does not a deterministic bug.

    python benchmarks/diff_vm.py tiny-gpu-8 --world 8 [--gpus 1] [--runs 3]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import compare_values, off_rows  # noqa: E402
from tilert.engine.persistent import compile_ranks  # noqa: E402
from tilert.models.binding import bind_params  # noqa: E402
from tilert.models.builder import build_step_graph  # noqa: E402
from tilert.models.config import load_config  # noqa: E402
from tilert.models.weights import margin_safe_weights  # noqa: E402
from tilert.runtime.persistent.plan_vm import PlanVM  # noqa: E402
from tilert.runtime.persistent.step import MultiRankStep  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--world", type=int, default=2)
ap.add_argument("--gpus", type=int, default=1, help="1: every rank on cuda:0; world: rank r on cuda:r")
ap.add_argument("--runs", type=int, default=1, help="fresh programs, the same inputs (a race shows as a change)")
a = ap.parse_args()
model, world, gpus, reps = a.model, a.world, a.gpus, a.runs
cfg = load_config(model)
w = margin_safe_weights(cfg, 7)
B = cfg.dflash.block_size
g = build_step_graph(cfg, tokens=B, mode="verify", max_seq=256)
graphs, scheds = compile_ranks(g, 256, world, gpus=gpus)
pc = [bind_params(rg, w, {}) for rg in graphs]
devs = None if gpus == 1 else [f"cuda:{r}" for r in range(world)]
params = [{k: v.to(d) for k, v in p.items()} for p, d in zip(pc, devs or ["cuda"] * world)]
tok = torch.randint(0, cfg.vocab_size, (B,), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
inp = {"tokens": tok, "positions": torch.arange(B, dtype=torch.int32)}
vm = PlanVM(pc)
vm.step(graphs, [s.table for s in scheds], inp)
for rep in range(reps):
    ms = MultiRankStep(graphs, scheds, params, devices=devs)
    ms.run(inp)
    bad = []
    for r in range(world):
        for row in off_rows(compare_values(graphs[r], ms.ranks[r].bind.env, vm.ranks[r].env), 5e-2):
            bad.append((r, row["node"], row["op"], row["value"], round(row.get("rel_err", float("nan")), 3)))
    print(f"{model} world {world} on {gpus} GPU(s), run {rep}: {len(bad)} bad values; first per rank:")
    seen = set()
    for b in bad:
        if b[0] not in seen:
            seen.add(b[0])
            print("   ", b)
    del ms
