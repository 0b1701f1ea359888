"""End-to-end decode step of one rank's full-scale shard on one GPU (issue 6 / 8).

Rank 0 of an N-rank mimo-v2.5-pro plan (70 layers, 48 local experts, 16 query heads; synthetic
MXFP4/FP8 weights generated on the GPU, ~70 GB), each collective replaced by local work of the
same size. Side by side in one run, for B=1 (decode) and B=8 (DFlash verify): the eager runtime
(one launch per fused op), the same step captured in a CUDA graph, a plain torch eager
implementation (the op references on the GPU: dequantise, then torch matmul), and the floor and
prediction of the cost model. Writes benchmarks/results/e2e-<device>.json.

Routing is by token (the synthetic router's own choices, which differ by token: a verify block's
MoE load); the blocks of --pinned-blocks (default: 8) are measured once more with pinned routing
(one expert per rank for every token: logits comparable with eager's), as rows "<B>.pinned".
For every persistent step the run also prints and writes:
- the stream-rate / hand-over report of the kernel's own trace (`trace_analysis`: per task kind the
  run, wait, fixed and hand-over times and the weight stream in GB/s per SM against the copy
  bandwidth's per-SM share; docs/profiling.md says how to read it);
- the compiler's predicted step for this GPU kind (tilert/gpu_specs.py) against the measured one
  (`cost_model_check`: measured / predicted, for uniform routing and for the routing measured).

    python benchmarks/e2e.py [--model mimo-v2.5-pro] [--world-size 8] [--context 4096] [--accept-len 6.3]

On a node with at least --world-size GPUs (or with --ranks gpus) every rank runs on its own GPU
instead (benchmarks/e2e_ranks.py): eager over NCCL and persistent over NVLink peer memory, side by
side, with the collective time per layer and the gap to the cost model; it writes
benchmarks/results/e2e-<N>x<device>.json (e2e-8xh200.json on 8 H200s).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    active_experts,
    compare_values,
    copy_bandwidth,
    off_rows,
    pin_routing,
    time_cuda,
    time_step,
    write_result,
)
from benchmarks.e2e_ranks import bench_ranks  # noqa: E402
from tilert.engine.eager import compile_for_gpu  # noqa: E402
from tilert.engine.persistent import compile_step  # noqa: E402
from tilert.gpu_specs import H200, GpuSpec, gpu_spec_for_device  # noqa: E402
from tilert.kernels import switches  # noqa: E402
from tilert.models.config import load_config  # noqa: E402
from tilert.models.drafter import build_drafter_graph  # noqa: E402
from tilert.profile.calibration import compile_rank, predicted_step_ms  # noqa: E402
from tilert.profile.timeline import measured_trace  # noqa: E402
from tilert.profile.trace_analysis import analyse, format_analysis, run_from_step, task_work  # noqa: E402
from tilert.runtime.eager.runtime import EagerRuntime  # noqa: E402
from tilert.runtime.eager.synthetic import synthetic_params  # noqa: E402
from tilert.runtime.persistent.step import PersistentStep  # noqa: E402


def predicted(model: str, world: int, max_seq: int, context: int, accept_len: float, gpu: str = "h200") -> dict:
    """The compiler's cost-model figures for this plan, every rank on its own GPU of kind `gpu`
    (python -m tilert compile --json)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "tilert",
            "compile",
            "--model",
            model,
            "--gpus",
            str(world),
            "--out",
            out,
            "--max-seq",
            str(max_seq),
            "--context",
            str(context),
            "--accept-len",
            str(accept_len),
            "--gpu",
            gpu,
            "--json",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip()[-500:]}
    d = json.loads(r.stdout)
    keys = ("predicted_step_ms", "floor_step_ms", "projected_tokens_per_s", "eager_step_ms", "eager_graph_step_ms")
    return {k: d.get(k) for k in keys if k in d}


def diff_nodes(st, rt, g, inputs, tol: float = 0.1) -> list[dict]:
    """Every node output of the persistent step (its last run) against the eager runtime's on the same
    inputs: relative error (float64 norms) per value, in graph order. A kernel bug shows as the first
    value whose error jumps far above the bf16 drift (about 1e-2)."""
    env = rt._env(g, inputs)
    rt._execute(g, env)
    torch.cuda.synchronize()
    rows = compare_values(g, st.bind.env, env)
    bad = off_rows(rows, tol)
    print(f"diff: {len(rows)} values compared, {len(bad)} off (rel err > {tol}, unequal ints or non-finite)")
    for r in rows[:0] + bad[:12]:
        print("  ", r)
    worst = {}
    for r in rows:
        if "rel_err" in r:
            worst[r["op"]] = max(worst.get(r["op"], 0.0), r["rel_err"])
    print("  worst rel err per op:", {k: round(v, 4) for k, v in worst.items()})
    return rows


def moe_active(st: PersistentStep) -> dict[int, int]:
    """Local experts the last step's top-k activated, per fused MoE node (its device-side Count)."""
    return {i: int(p.tensors[[v[0] for v in p.specs].index("count")][0]) for i, p in enumerate(st.programs)
            if p.key and p.key[0] == "moe"}  # fmt: skip


def stream_report(st: Any, rank: Any, copy_bw: float | None, active: dict[int, int] | None) -> dict:
    """The stream-rate / hand-over figures of the step's last launch, from the kernel's own trace
    (`trace_analysis.analyse`; the expert tasks' work as the measured routing gave it)."""
    run = run_from_step(st)
    return analyse(run, task_work(rank.graph, rank.tiles, run.table, active), copy_bw)


def cost_model_check(cfg: Any, tokens: int, world: int, spec: GpuSpec, max_seq: int, context: int,
                     measured_ms: float, routed: float | None = None) -> dict:  # fmt: skip
    """The compiler's predicted persistent step for this GPU kind (`spec`: solo or with peers, as
    measured) against the measured one: for uniform routing (the compiler's own figure) and, given
    `routed` (the mean local experts per MoE layer the step ran), for that routing."""
    uniform = predicted_step_ms(cfg, tokens, world, spec, max_seq, context)
    out = {"gpu": spec.name, "collectives": "solo" if spec.collective_latency_s == 0 else "peers",
           "predicted_ms": round(uniform, 3), "measured_ms": round(measured_ms, 3),
           "measured_over_predicted": round(measured_ms / uniform, 3)}  # fmt: skip
    if routed is not None:
        at = predicted_step_ms(cfg, tokens, world, spec, max_seq, context, routed)
        out.update(routed_experts=routed, predicted_at_measured_routing_ms=round(at, 3),
                   measured_over_predicted_at_measured_routing=round(measured_ms / at, 3))  # fmt: skip
    return out


def format_check(key: str, c: dict) -> str:
    line = (f"cost model, B={key}: measured {c['measured_ms']:.3f} ms, predicted {c['predicted_ms']:.3f} ms "
            f"({c['gpu']}, {c['collectives']} collectives, uniform routing): measured / predicted "
            f"{c['measured_over_predicted']:.3f}")  # fmt: skip
    if "predicted_at_measured_routing_ms" in c:
        at, ratio = c["predicted_at_measured_routing_ms"], c["measured_over_predicted_at_measured_routing"]
        line += f"; at the measured routing ({c['routed_experts']} local experts a layer) {at:.3f} ms: {ratio:.3f}"
    return line


def bench_block(cfg, B: int, a: argparse.Namespace, max_seq: int, cache: dict, pinned: bool = False) -> dict:
    """Persistent, eager, eager + CUDA graph and plain-torch step times for B query tokens, the
    persistent step's logits against the eager step's (same weights, same inputs, fresh caches) and
    the stream-rate / hand-over report of its trace. `pinned`: the step runs with pinned routing (the
    weights' router biases stay pinned from then on)."""
    mode = "verify" if B > 1 else "decode"
    tag = f"B={B}" + (" (pinned routing)" if pinned else " (routing by token)")
    t0 = time.time()
    rank = compile_rank(cfg, B, a.world_size, H200, max_seq)  # the table e2e has always run: H200 costs
    g, sched = rank.graph, rank.schedule
    if "params" not in cache:
        cache["params"] = synthetic_params(g, seed=0)
        torch.cuda.synchronize()
        gb = sum(v.nbytes for v in g.by_role("param")) / 1e9
        print(f"synthetic rank-0 weights: {gb:.1f} GB ({time.time() - t0:.1f} s)", flush=True)
    if pinned and not cache.get("pinned"):
        pin_routing(cache["params"], a.world_size)
        cache["pinned"] = True
    start = a.context
    inputs = {
        "tokens": torch.randint(0, cfg.vocab_size, (B,), dtype=torch.int32, device="cuda"),
        "positions": torch.arange(start, start + B, dtype=torch.int32, device="cuda"),
    }
    row: dict = {}
    try:
        t1 = time.time()
        st = PersistentStep(g, sched.table, sched.counter_expected, cache["params"])
        print(f"persistent step program: {st.n_classes} node classes, {int((sched.table[:, :, 0] != 0).sum())} "
              f"tasks, built in {time.time() - t1:.1f} s", flush=True)  # fmt: skip
        p_out = {k: v.clone() for k, v in st.run(inputs).items()}
        t_pers = None if a.skip_timing else time_cuda(lambda: st.launch(inputs), iters=20, warmup=3)
        st.check()
        row.update(persistent_ms=t_pers, persistent_tasks=int((sched.table[:, :, 0] != 0).sum()),
                   persistent_node_classes=st.n_classes, active_experts=active_experts(st))  # fmt: skip
        st.run(inputs)
        active = moe_active(st)
        if a.trace_dir:
            Path(a.trace_dir).mkdir(parents=True, exist_ok=True)
            tp = Path(a.trace_dir) / f"trace_persistent_{mode}.B{B}{'.pinned' if pinned else ''}.json.gz"
            meta = {"model": cfg.name, "world": a.world_size, "tokens": B, "layers": cfg.num_hidden_layers,
                    "max_seq": max_seq, "context": a.context, "routing": "pinned" if pinned else "token",
                    "active_experts": active, "copy_bandwidth_Bps": cache.get("copy_bw")}  # fmt: skip
            tp.write_bytes(gzip.compress(json.dumps(measured_trace(st, meta=meta), separators=(",", ":")).encode()))
            row["persistent_trace"] = str(tp)
        try:
            rep = stream_report(st, rank, cache.get("copy_bw"), active)
            print(f"{tag}: the persistent kernel's trace (stream rates, hand-overs):", flush=True)
            print(format_analysis(rep), flush=True)
            row["stream_report"] = rep
        except Exception as e:  # a report that fails keeps the measured times
            traceback.print_exc()
            row["stream_report_error"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # keep the eager figures
        traceback.print_exc()
        row["persistent_error"] = f"{type(e).__name__}: {e}"
        p_out = None
    rt = EagerRuntime(cache["params"], world=a.world_size, solo=True)
    plain = EagerRuntime(cache["params"], world=a.world_size, solo=True, use_kernels=False)
    out = rt.run(g, inputs)  # compiles kernels
    torch.cuda.synchronize()
    if a.diff_nodes and p_out is not None:
        rows = diff_nodes(st, rt, g, inputs)
        row["node_diff_off"] = [r for r in rows if r.get("rel_err", 0) > 0.1 or r.get("equal") is False][:50]
    finite = bool(torch.isfinite(out["logits"]).all())
    if p_out is not None:
        ref, got = out["logits"].double(), p_out["logits"].double()
        row["persistent_vs_eager_logits_rel_err"] = float((got - ref).norm() / ref.norm())
        same = torch.equal(out["next_tokens"].long(), p_out["next_tokens"].long())
        row["persistent_next_tokens_equal_eager"] = bool(same)
        note = "" if pinned else " (routing by token: near-tied experts round to other choices; pinned rows compare)"
        print(f"persistent vs eager logits: rel err {row['persistent_vs_eager_logits_rel_err']:.2e}{note}", flush=True)
    t_eager, t_graph = (float("nan"), None) if a.skip_timing else time_step(rt, g, inputs)
    t_plain = None
    if not a.skip_plain:
        pl = plain.run(g, inputs)["logits"].double()
        row["plain_vs_eager_logits_rel_err"] = float((pl - out["logits"].double()).norm() / pl.norm())
        if p_out is not None:
            row["persistent_vs_plain_logits_rel_err"] = float((p_out["logits"].double() - pl).norm() / pl.norm())
        t_plain = time_cuda(lambda: plain.run(g, inputs), iters=3, warmup=1)
    print(
        f"{tag}: persistent {row.get('persistent_ms')} ms | eager {t_eager:.2f} ms | eager+graph {t_graph} ms | "
        f"plain torch {t_plain if t_plain is None else round(t_plain, 2)} ms",
        flush=True,
    )
    row.update({
        "eager_ms": t_eager,
        "eager_graph_ms": t_graph,
        "plain_torch_ms": t_plain,
        "launches_per_step": {"eager": len(g.nodes), "eager_graph": 1, "persistent": 1},
        "fused_ops": g.op_counts(),
        "finite_logits": finite,
    })  # fmt: skip
    return row


def bench_drafter(cfg, a: argparse.Namespace, max_seq: int) -> dict:
    """The DFlash drafter pass (block B, B new context rows) of rank 0: eager, eager + CUDA graph and
    the persistent drafter step (its drafts against the eager step's)."""
    B = cfg.dflash.block_size
    g = compile_for_gpu(build_drafter_graph(cfg, context=B, max_seq=max_seq), max_seq, a.world_size)[0]
    rt = EagerRuntime(synthetic_params(g, seed=1), world=a.world_size, solo=True)
    start = a.context
    feats = torch.randn(B, g.values["ctx_features"].shape[1], device="cuda").to(torch.bfloat16)
    inputs = {
        "block_tokens": torch.zeros(B, dtype=torch.int32, device="cuda"),
        "block_positions": torch.arange(start, start + B, dtype=torch.int32, device="cuda"),
        "ctx_features": feats,
        "ctx_positions": torch.arange(start - B, start, dtype=torch.int32, device="cuda"),
    }
    eager_draft = rt.run(g, inputs)["draft"].cpu()
    t_eager, t_graph = time_step(rt, g, inputs)
    row: dict = {}
    try:  # the same step as one persistent launch (PersistentBackend's drafter), on the same weights
        rg, sched = compile_step(build_drafter_graph(cfg, context=B, max_seq=max_seq), max_seq, a.world_size)
        st = PersistentStep(rg, sched.table, sched.counter_expected, rt.params)
        draft = st.run(inputs)["draft"].cpu()
        row["persistent_ms"] = None if a.skip_timing else time_cuda(lambda: st.launch(inputs), iters=20, warmup=3)
        st.check()
        row["persistent_draft_equals_eager"] = bool(torch.equal(draft, eager_draft))
    except Exception as e:  # noqa: BLE001 (reported in the results, the run goes on)
        row["persistent_error"] = f"{type(e).__name__}: {e}"
    print(f"drafter (B={B}): persistent {row.get('persistent_ms')} ms | eager {t_eager:.2f} ms | eager+graph "
          f"{t_graph} ms", flush=True)  # fmt: skip
    return {
        "eager_ms": t_eager,
        "eager_graph_ms": t_graph,
        **row,
        "launches_per_step": {"eager": len(g.nodes), "persistent": 1},
        "fused_ops": g.op_counts(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mimo-v2.5-pro")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--accept-len", type=float, default=6.3)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace-dir", default=None, help="write the persistent kernel's measured per-SM traces here")
    ap.add_argument("--skip-drafter", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers (a quick check)")
    ap.add_argument("--diff-nodes", action="store_true", help="compare every persistent node output with eager's")
    ap.add_argument("--skip-timing", action="store_true", help="correctness only: no step timings")
    ap.add_argument("--ranks", choices=("auto", "solo", "gpus"), default="auto",
                    help="solo: rank 0 alone, collectives as local work; gpus: every rank on its own GPU; "
                         "auto: gpus when --world-size GPUs are visible")  # fmt: skip
    ap.add_argument("--rank-timeout", type=float, default=1800.0, help="bound on the eager NCCL phase (s)")
    ap.add_argument("--routing", choices=("token", "pinned", "random"), default="token",
                    help="token: the synthetic router's choices, which differ by token (a verify block's MoE "
                         "load; 'random' is the same); pinned: one clear expert per rank for every token "
                         "(comparable logits)")  # fmt: skip
    ap.add_argument("--pinned-blocks", type=int, nargs="*", default=[8],
                    help="with routing by token, measure these blocks once more with pinned routing (rows "
                         "'<B>.pinned'; none: skip)")  # fmt: skip
    a = ap.parse_args(argv)
    a.routing = "token" if a.routing == "random" else a.routing
    return a


def main() -> None:
    a = parse_args()
    ranks = a.ranks
    if ranks == "auto":
        ranks = "gpus" if a.world_size > 1 and torch.cuda.device_count() >= a.world_size else "solo"
    if ranks == "gpus" and torch.cuda.device_count() < a.world_size:
        raise SystemExit(f"--ranks gpus needs {a.world_size} GPUs; {torch.cuda.device_count()} visible")
    cfg = load_config(a.model)
    if a.layers:
        cfg = cfg.first_layers(a.layers)
    max_seq = a.context + 64
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    spec = gpu_spec_for_device(torch.cuda.get_device_name())
    pred = None
    if not a.layers:
        pred = predicted(a.model, a.world_size, max_seq, a.context, a.accept_len, spec.name if spec else "h200")
    print(f"cost model ({spec.name if spec else 'h200'}, every rank on its own GPU): {pred}", flush=True)
    rows, cache = {}, {"copy_bw": bw}
    if ranks == "gpus":
        rows = bench_ranks(a, max_seq)
    runs = [(str(B), B, a.routing == "pinned") for B in a.blocks]
    if a.routing == "token":
        runs += [(f"{B}.pinned", B, True) for B in a.pinned_blocks]
    for key, B, pinned in runs if ranks == "solo" else ():
        try:
            rows[key] = bench_block(cfg, B, a, max_seq, cache, pinned)
        except Exception as e:  # keep the figures measured so far
            traceback.print_exc()
            rows[key] = {"error": f"{type(e).__name__}: {e}"}
    for key, row in rows.items():
        if not (spec and row.get("persistent_ms") and key.split(".")[0].isdigit()):
            continue
        try:  # the compiler's prediction for this GPU kind and mode against the measured step
            routed = (row.get("active_experts") or {}).get("mean")
            kind = spec.solo() if ranks == "solo" else spec
            check = cost_model_check(cfg, int(key.split(".")[0]), a.world_size, kind, max_seq, a.context,
                                     row["persistent_ms"], routed)  # fmt: skip
        except Exception as e:
            traceback.print_exc()
            row["cost_model_check"] = {"error": f"{type(e).__name__}: {e}"}
            continue
        row["cost_model_check"] = check
        row["persistent_over_cost_model"] = check["measured_over_predicted"]
        print(format_check(key, check), flush=True)
    try:
        rows["drafter"] = {"skipped": True} if a.skip_drafter else bench_drafter(cfg, a, max_seq)
    except Exception as e:
        rows["drafter"] = {"error": f"{type(e).__name__}: {e}"}
    verify, draft = rows.get("8", {}).get("eager_graph_ms"), rows["drafter"].get("eager_graph_ms")
    pverify = rows.get("8", {}).get("persistent_ms")
    pdraft = rows["drafter"].get("persistent_ms") or draft  # the persistent backend's drafter, where it ran
    tps_persistent = a.accept_len / ((pverify + pdraft) * 1e-3) if pverify and pdraft else None
    if verify and draft:
        tps = a.accept_len / ((verify + draft) * 1e-3)
        note = "tokens/s per user = accept_len / (verify step B=8 + drafter step), both measured as eager + CUDA graph"
    else:
        tps, note = None, "not projected: a step failed"
    res = {
        "model": a.model,
        "world_size": a.world_size,
        "rank": 0 if ranks == "solo" else "all",
        "context": a.context,
        "mode": "solo rank 0" if ranks == "solo" else f"{a.world_size} ranks on {a.world_size} GPUs",
        "copy_bandwidth_Bps": bw,
        "cost_model": pred,
        "accept_len": a.accept_len,
        "switches": switches.current(),  # the build switches its steps ran under (calibrate_costs.py)
        "routing": a.routing,
        "routing_note": "steps '<B>' ran with the routing above; steps '<B>.pinned' with pinned routing (one "
        "expert per rank for every token: comparable logits, not a verify block's MoE load)",
        "cost_model_gpu": spec.name if spec else None,
        "steps": rows,
        "projected_tokens_per_s_per_user": tps,
        "projected_tokens_per_s_per_user_persistent": tps_persistent,
        "projection_formula": note,
        "projection_formula_persistent": "accept_len / (persistent verify step B=8 + persistent drafter step, or "
        "the drafter's eager + CUDA graph time where the persistent one did not run)",
        "persistent": "one launch per step: the compiler's task table run by runtime/persistent/step.py",
    }
    if ranks == "gpus":
        res["drafter_note"] = "the drafter step is measured on GPU 0 alone (solo collectives)"
        res["layers"] = a.layers or cfg.num_hidden_layers
    short = torch.cuda.get_device_name().lower().replace(" ", "-").removeprefix("nvidia-")
    print(write_result("e2e", res, a.out, name=None if ranks == "solo" else f"{a.world_size}x{short}"))


if __name__ == "__main__":
    main()
