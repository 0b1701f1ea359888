"""Every rank of the step on its own GPU (issue 8): `benchmarks/e2e.py --world-size N` on a node with
N GPUs runs this instead of the solo rank-0 mode.

Two phases over the same synthetic weights (rank r: `synthetic_params(rank graph, seed=r)` on
cuda:r, the routing pinned as in the solo mode) and the same inputs:

1. eager, one process per rank (`run_local`, NCCL, NVLink multicast off): step time with eager
   launches and replayed from a CUDA graph, and rank 0's logits. The processes exit, so their
   weights are freed before
2. persistent, one process driving every GPU (`MultiRankStep`): one launch per rank per step, the
   collectives as tile tasks writing the peers' inboxes over NVLink. Step time (wall clock over
   back-to-back steps, every GPU synchronised), rank 0's measured trace and from it the collective
   time per layer, and the logits against the eager phase's.

Both phases compile each rank's graph with `compile_ranks(..., gpus=world)`, so the eager runtime
runs the very graphs the persistent kernels run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import active_experts, pin_routing, time_step
from tilert.engine.persistent import compile_ranks
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.profile.timeline import measured_trace
from tilert.runtime.eager.distributed import multicast_off, run_local
from tilert.runtime.eager.runtime import EagerRuntime
from tilert.runtime.eager.synthetic import synthetic_params
from tilert.runtime.persistent.step import MultiRankStep

COLLECTIVE_OPCODES = ("ALL_REDUCE", "MOE_REDUCE", "ALL_GATHER")  # tasks that wait for their peers


def rank_graphs(model: str, layers: int | None, B: int, max_seq: int, world: int) -> tuple[Any, list, list]:
    """(config, every rank's compiled graph, their schedules) for a B-token step."""
    cfg = load_config(model)
    if layers:
        cfg = cfg.first_layers(layers)
    mode = "verify" if B > 1 else "decode"
    graphs, scheds = compile_ranks(build_step_graph(cfg, tokens=B, max_seq=max_seq, mode=mode), max_seq, world,
                                   gpus=world)  # fmt: skip
    return cfg, graphs, scheds


def step_inputs(vocab: int, B: int, context: int, device: str) -> dict[str, torch.Tensor]:
    """The same tokens on every rank and in both phases (a fixed CPU generator)."""
    gen = torch.Generator().manual_seed(1000 + B)
    return {
        "tokens": torch.randint(0, vocab, (B,), dtype=torch.int32, generator=gen).to(device),
        "positions": torch.arange(context, context + B, dtype=torch.int32, device=device),
    }


def rank_params(graph: Any, rank: int, world: int, device: str, routing: str = "pinned") -> dict[str, Any]:
    with torch.cuda.device(device):
        params = synthetic_params(graph, seed=rank, device=device)
    return pin_routing(params, world) if routing == "pinned" else params


def eager_rank_job(ctx: Any, model: str, layers: int | None, world: int, blocks: list[int], context: int,
                   max_seq: int, routing: str = "pinned") -> dict[str, Any]:  # fmt: skip
    """One NCCL rank (runs in a run_local process): eager and eager + CUDA graph step times per B."""
    dev = str(ctx.device)
    out: dict[str, Any] = {}
    params = None
    for B in blocks:
        cfg, graphs, _ = rank_graphs(model, layers, B, max_seq, world)
        g = graphs[ctx.rank]
        if params is None:  # every step shape binds the same weights
            params = rank_params(g, ctx.rank, world, dev, routing)
        rt = EagerRuntime(params, device=dev, ctx=ctx)
        inputs = step_inputs(cfg.vocab_size, B, context, dev)
        res = rt.run(g, inputs)
        torch.cuda.synchronize()
        row: dict[str, Any] = {"logits": res["logits"].float().cpu(), "next_tokens": res["next_tokens"].cpu()}
        row["eager_ms"], row["eager_graph_ms"] = time_step(rt, g, inputs)
        out[str(B)] = row
    return out


def collective_us_per_layer(trace: dict[str, Any], layers: int) -> dict[str, float]:
    """Span of every collective node (first task start to last task end), summed per opcode and
    divided by the layer count: the time a layer spends in its all-reduces (with the stages that
    wait on them, this is where the link shows)."""
    by_node: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") in COLLECTIVE_OPCODES:
            by_node.setdefault((e["args"]["node"], e["cat"]), []).append((e["ts"], e["ts"] + e["dur"]))
    per: dict[str, float] = {}
    for (_, cat), spans in by_node.items():
        per[cat] = per.get(cat, 0.0) + max(b for _, b in spans) - min(a for a, _ in spans)
    return {k: round(v / max(1, layers), 2) for k, v in sorted(per.items())}


def time_ranks(step: Any, inputs: dict[str, torch.Tensor], iters: int = 20, warmup: int = 3) -> float:
    """Milliseconds per step: `iters` back-to-back launches on every rank, every GPU synchronised
    (median of 3 such rounds)."""
    for _ in range(warmup):
        step.launch(inputs)
    step.synchronize()
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            step.launch(inputs)
        step.synchronize()
        rounds.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(rounds)


def bench_ranks(a: argparse.Namespace, max_seq: int) -> dict[str, Any]:
    """Both phases for every block size in a.blocks; one row per B."""
    multicast_off()
    world = a.world_size
    rows: dict[str, Any] = {str(B): {} for B in a.blocks}
    t0 = time.time()
    try:
        eager = run_local(eager_rank_job, world, a.model, a.layers, world, list(a.blocks), a.context, max_seq,
                          a.routing, device="cuda", timeout_s=a.rank_timeout, collective_timeout_s=300)  # fmt: skip
        print(f"eager phase, {world} NCCL ranks: {time.time() - t0:.0f} s", flush=True)
    except Exception as e:  # keep the persistent figures
        print(f"eager phase failed: {e}", flush=True)
        eager = None
    for B in a.blocks:
        if eager is not None:
            r = rows[str(B)]
            r["eager_ms_per_rank"] = [e[str(B)]["eager_ms"] for e in eager]
            r["eager_graph_ms_per_rank"] = [e[str(B)]["eager_graph_ms"] for e in eager]
            r["eager_ms"] = max(r["eager_ms_per_rank"])
            graphs_ms = r["eager_graph_ms_per_rank"]
            r["eager_graph_ms"] = None if None in graphs_ms else max(graphs_ms)
            r["launches_per_step"] = {"eager_graph": 1, "persistent": 1}
    devices = [f"cuda:{r}" for r in range(world)]
    params = None
    for B in a.blocks:
        row = rows[str(B)]
        try:
            t1 = time.time()
            cfg, graphs, scheds = rank_graphs(a.model, a.layers, B, max_seq, world)
            if params is None:
                params = [rank_params(g, r, world, d, a.routing) for r, (g, d) in enumerate(zip(graphs, devices))]
                gb = sum(v.nbytes for v in graphs[0].by_role("param")) / 1e9
                print(f"synthetic weights: {gb:.1f} GB per rank ({time.time() - t1:.0f} s)", flush=True)
            step = MultiRankStep(graphs, scheds, params, devices=devices)
            print(f"B={B}: {world} persistent rank programs built in {time.time() - t1:.0f} s", flush=True)
            # pinned host tensors: each rank's input copy stays asynchronous (a pageable one would
            # wait for the rank's previous step and put the launch latency into the timing)
            inputs = {k: v.pin_memory() for k, v in step_inputs(cfg.vocab_size, B, a.context, "cpu").items()}
            outs = step.run(inputs)
            ids = [o["next_tokens"].cpu() for o in outs]
            row["persistent_next_tokens_equal_across_ranks"] = all(torch.equal(ids[0], x) for x in ids)
            if eager is not None:
                ref, got = eager[0][str(B)]["logits"].double(), outs[0]["logits"].double().cpu()
                row["persistent_vs_eager_logits_rel_err"] = float((got - ref).norm() / ref.norm())
                want = eager[0][str(B)]["next_tokens"].long()
                row["persistent_next_tokens_equal_eager"] = bool(torch.equal(ids[0].long(), want))
                print(f"B={B}: persistent vs eager logits (rank 0) rel err "
                      f"{row['persistent_vs_eager_logits_rel_err']:.2e}", flush=True)  # fmt: skip
            row["active_experts_rank0"] = active_experts(step.ranks[0])
            if not a.skip_timing:
                row["persistent_ms"] = time_ranks(step, inputs)
            step.run(inputs)
            trace = measured_trace(step.ranks[0])
            row["collective_us_per_layer"] = collective_us_per_layer(trace, cfg.num_hidden_layers)
            if a.trace_dir:
                Path(a.trace_dir).mkdir(parents=True, exist_ok=True)
                tp = Path(a.trace_dir) / f"trace_persistent_{world}ranks.B{B}.rank0.json.gz"
                tp.write_bytes(gzip.compress(json.dumps(trace, separators=(",", ":")).encode()))
                row["persistent_trace"] = str(tp)
            print(f"B={B}: persistent {row.get('persistent_ms')} ms | eager {row.get('eager_ms')} ms | "
                  f"eager+graph {row.get('eager_graph_ms')} ms | collectives per layer "
                  f"{row['collective_us_per_layer']} us", flush=True)  # fmt: skip
            del step
        except Exception as e:  # keep the other block sizes

            traceback.print_exc()
            row["persistent_error"] = f"{type(e).__name__}: {e}"
    return rows
