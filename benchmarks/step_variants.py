"""Build switches of the persistent step side by side in one run: the same rank graph, weights and
inputs, one PersistentStep per variant (a variant is a set of environment switches read while its
table and step program are built, e.g. TILERT_MOE_BODY=gemv or TILERT_MOE_TOPK=task), timed in
interleaved rounds so that clock and thermal drift hit every variant alike; each variant's outputs
are compared with the first's. The variants share one set of synthetic weights; a variant built
under another MXFP4 word order (TILERT_MXFP4_ORDER) gets them converted in place before it runs
(untimed), so it reads the same logical weights and its outputs can equal the first's exactly.

    python benchmarks/step_variants.py --layers 4 --tokens 1 8 --routing random \\
        --variant base --variant moe2:TILERT_MOE_PREFETCH=2 [--out DIR]
    python benchmarks/step_variants.py --layers 4 --tokens 1 8 --variant base \
        --variant lgemv:TILERT_LINEAR_BODY=gemv --variant both:TILERT_LINEAR_BODY=gemv,TILERT_MOE_BODY=gemv
    python benchmarks/step_variants.py --precompile [--pack OUT.tar.xz] ...   # the same kernels into
                                                      # the cache (no GPU), and those kernels as one archive

Rank 0 of the model's plan (synthetic weights, solo collectives) as benchmarks/e2e.py builds it;
routing `random` is the synthetic router's own choice, which differs by token (what a verify block
sees), `pinned` is benchmarks.common.pin_routing. Writes DIR/step-variants-<device>.json after each
token count (`tokens_timed`: those it holds, so a run cut short keeps what it timed); each row
holds the median task time per opcode of the variant's last timed launch (`task_median_us`, from the
kernel's own trace), and --trace-dir writes those traces (trace-<variant>.B<n>.json.gz). Each
variant's build is printed to stderr as it ends, with its phases' times (--profile-build N adds
the last variant's first build's N costliest calls). A variant built with TILERT_PROBES=on also gets
`probe_median_us`: per opcode, the median of each of its bodies' phase stamps (us after the
task's start of run; docs/profiling.md). For the whole model, `cost_model_check` holds the
compiler's predicted step for this GPU kind (solo collectives) against the first variant's time,
as benchmarks/e2e.py reports it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import active_experts, pin_routing, write_result  # noqa: E402
from benchmarks.e2e import cost_model_check, format_check  # noqa: E402
from tilert.engine.persistent import compile_step, precompile  # noqa: E402
from tilert.gpu_specs import gpu_spec_for_device  # noqa: E402
from tilert.kernels import switches  # noqa: E402
from tilert.kernels.common import kernel_resources  # noqa: E402
from tilert.models.builder import build_step_graph  # noqa: E402
from tilert.models.config import load_config  # noqa: E402
from tilert.numerics import mxfp4  # noqa: E402
from tilert.ops.qtensor import QTensor  # noqa: E402
from tilert.profile.timeline import measured_trace, probe_medians  # noqa: E402
from tilert.runtime.eager.synthetic import synthetic_params  # noqa: E402
from tilert.runtime.persistent.step import PersistentStep  # noqa: E402

IDS = ("next_tokens", "accept")  # integer outputs of a step


def pack_entries(entries: list[Path], out: Path) -> Path:
    """The kernel-cache entries (TileLang's kernels/<version>/<platform>/kernels/<hash> folders) as one
    .tar.xz holding them under kernels/, the layout `scripts/precompile_gpu.py --pack` writes: unpack
    with `tar -C DIR -xJf OUT`, TILERT_KERNEL_CACHE=DIR/kernels. TileLang's nvcc cubin copies stay out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tf:
        for e in sorted(set(entries)):
            root = e.parents[3]  # the cache folder above <version>/<platform>/kernels/<hash>
            for f in sorted(e.iterdir()):
                if f.is_file() and not f.name.endswith(".so.cubin"):
                    tf.add(f, arcname=str(Path("kernels") / f.relative_to(root)))
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name:KEY=VAL,KEY=VAL' -> (name, {KEY: VAL}); 'name' alone: no switches (the defaults)."""
    name, _, rest = text.partition(":")
    env = {}
    for kv in filter(None, rest.split(",")):
        k, eq, v = kv.partition("=")
        if not eq or not k.startswith("TILERT_"):
            raise SystemExit(f"variant {text!r}: switches are TILERT_NAME=VALUE, comma-separated")
        env[k] = v
    return name, env


class WeightOrder:
    """The MXFP4 word order the shared synthetic weights are in (TILERT_MXFP4_ORDER): `use(order)`
    converts every MXFP4 weight in place before a variant built under another order runs, so each
    variant reads the same logical weights (and its outputs can equal the first's bit for bit)."""

    def __init__(self, params: dict, order: str) -> None:
        blocks = {w.data.data_ptr(): w.data for w in params.values() if isinstance(w, QTensor) and w.fmt == "mxfp4"}
        self.blocks = list(blocks.values())  # once each, should two params share one tensor
        self.order = order

    def use(self, order: str) -> None:
        if order != self.order:
            for b in self.blocks:
                mxfp4.reorder_(b, self.order, order)
            if any(b.is_cuda for b in self.blocks):
                torch.cuda.synchronize()
            self.order = order


def time_interleaved(steps: dict[str, PersistentStep], inputs: dict, rounds: int, per_round: int,
                     before: Callable[[str], None] = lambda name: None) -> dict[str, float]:  # fmt: skip
    """Median ms per launch of each step: `rounds` rounds, each timing `per_round` back-to-back
    launches of every step in turn (CUDA events around the batch; `before(name)` runs ahead of a
    step's batch, untimed)."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, st in steps.items():
            before(k)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(per_round):
                st.launch(inputs)
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


class StackSampler(threading.Thread):
    """Samples the main thread's Python stack every `period` s (a profiler whose cost does not grow
    with the number of calls, unlike cProfile): `report(n)` prints the n functions found on the most
    samples, as shares of the samples (cumulative: a function counts once per sample it is on)."""

    def __init__(self, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period, self.counts, self.samples = period, Counter(), 0
        self.target_id, self.done = threading.main_thread().ident, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            f = sys._current_frames().get(self.target_id)
            seen = set()
            while f is not None:
                seen.add(f"{f.f_code.co_filename.rsplit('site-packages/', 1)[-1]}:{f.f_code.co_name}")
                f = f.f_back
            self.counts.update(seen)
            self.samples += 1

    def report(self, n: int) -> None:
        self.done.set()
        self.join()
        print(f"build profile ({self.samples} samples of {self.period * 1000:.0f} ms):", file=sys.stderr)
        for fn, c in self.counts.most_common(n):
            print(f"  {100 * c / max(1, self.samples):5.1f}%  {fn}", file=sys.stderr)


def task_medians(trace: dict) -> dict[str, float]:
    """Median run time (us, ready to signal) of each opcode's tasks in a measured trace."""
    by: dict[str, list[float]] = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") not in (None, "WAIT"):
            by.setdefault(e["cat"], []).append(e["dur"])
    return {k: round(statistics.median(v), 3) for k, v in sorted(by.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mimo-v2.5-pro")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="the model cut to its first N layers")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--routing", choices=("pinned", "random"), default="random")
    ap.add_argument("--variant", action="append", default=[], help="name[:TILERT_X=V,...] (repeatable)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--precompile", action="store_true", help="build the variants' kernels (no GPU)")
    ap.add_argument("--pack", default=None, metavar="OUT.tar.xz",
                    help="with --precompile: the step kernels it built as one archive (for the GPU machine)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace-dir", default=None, help="write each variant's measured trace here")
    ap.add_argument("--profile-build", type=int, default=0, metavar="N",
                    help="print the N functions most often on the stack while the last variant's first build "
                         "ran (sampled every 20 ms)")  # fmt: skip
    a = ap.parse_args()
    variants = [parse_variant(v) for v in (a.variant or ["base"])]
    cfg = load_config(a.model)
    if a.layers:
        cfg = cfg.first_layers(a.layers)
    max_seq = a.context + 64
    if a.precompile:
        entries = []  # the cache folders of the step kernels built
        for name, env in variants:
            for B in a.tokens:
                t0 = time.time()
                with switches.applied(env):
                    st = precompile(cfg, B, "verify" if B > 1 else "decode", max_seq, a.world_size, peers=False)
                entries.append(getattr(st.kernel, "_tilelang_cache_path", None))
                print(f"{name} B={B}: {time.time() - t0:.0f} s", flush=True)
        if a.pack:
            print("packed", pack_entries([Path(e) for e in entries if e], Path(a.pack)))
        return
    rows, params, weights = [], None, None
    orders: dict[str, str] = {}  # variant -> the MXFP4 word order its kernels read
    t_start = time.time()
    spec = gpu_spec_for_device(torch.cuda.get_device_name())
    cost_checks: dict[str, dict] = {}  # B -> the cost model's prediction against the first variant
    for B in a.tokens:
        mode = "verify" if B > 1 else "decode"
        steps, kernels = {}, {}
        for vi, (name, env) in enumerate(variants):
            # the table too is compiled under the variant's switches: a switch may change the tasks
            # (TILERT_MOE_TOPK), not only the bodies
            prof = StackSampler() if a.profile_build and B == a.tokens[0] and vi == len(variants) - 1 else None
            if prof:
                prof.start()
            with switches.applied(env):
                orders[name] = mxfp4.order_choice()
                t0 = time.time()
                g, sched = compile_step(build_step_graph(cfg, tokens=B, max_seq=max_seq, mode=mode), max_seq,
                                        a.world_size)  # fmt: skip
                t1 = time.time()
                if params is None:
                    params = synthetic_params(g, seed=0)
                    weights = WeightOrder(params, orders[name])
                    if a.routing == "pinned":
                        pin_routing(params, a.world_size)
                t2 = time.time()
                steps[name] = PersistentStep(g, sched.table, sched.counter_expected, params)
                t3 = time.time()
            if prof:
                prof.report(a.profile_build)
            # where a build's time goes: the graph and schedule, the weights (first build), the step
            res = next(iter(kernel_resources(steps[name].kernel).values()), None)
            kernels[name] = res
            print(f"built {name} B={B} ({t3 - t_start:.0f} s: graph+schedule {t1 - t0:.1f} s, weights "
                  f"{t2 - t1:.1f} s, step {t3 - t2:.1f} s){f'; kernel {res}' if res else ''}", file=sys.stderr,
                  flush=True)  # fmt: skip
        gen = torch.Generator(device="cpu").manual_seed(B)
        inputs = {
            "tokens": torch.randint(0, cfg.vocab_size, (B,), dtype=torch.int32, generator=gen).cuda(),
            "positions": torch.arange(a.context, a.context + B, dtype=torch.int32, device="cuda"),
        }
        outs = {}
        for name, st in steps.items():  # fresh caches, one step each: the outputs to compare
            weights.use(orders[name])
            st.reset()
            outs[name] = {k: v.float().clone() for k, v in st.run(inputs).items()}
        first = next(iter(outs))
        ms = time_interleaved(steps, inputs, a.rounds, a.per_round, lambda name, w=weights: w.use(orders[name]))
        medians, probes = {}, {}
        for name, st in steps.items():
            st.check()
            tr = measured_trace(st, meta={"model": cfg.name, "tokens": B, "routing": a.routing, "variant": name})
            medians[name] = task_medians(tr)
            probes[name] = probe_medians(tr)
            if a.trace_dir:
                Path(a.trace_dir).mkdir(parents=True, exist_ok=True)
                tp = Path(a.trace_dir) / f"trace-{name}.B{B}.json.gz"
                tp.write_bytes(gzip.compress(json.dumps(tr, separators=(",", ":")).encode()))
        for name, env in variants:
            act = active_experts(steps[name])  # each variant's own top-k (a table without one shows it)
            diff = {k: float((outs[name][k] - v).abs().max()) for k, v in outs[first].items()}
            # ids (next tokens, acceptance) as the share equal to the first variant's; values as the
            # relative error in float64 norms (near-tied synthetic routing makes small roundings grow)
            same = {k: float((outs[name][k] == v).double().mean()) for k, v in outs[first].items() if k in IDS}
            rel = {k: float((outs[name][k].double() - v.double()).norm() / v.double().norm().clamp_min(1e-30))
                   for k, v in outs[first].items() if k not in IDS}  # fmt: skip
            row = {"variant": name, "env": env, "tokens": B, "ms": round(ms[name], 4),
                   "vs_first": round(ms[name] / ms[first], 4), "max_abs_diff_vs_first": diff,
                   "rel_err_vs_first": rel, "ids_equal_vs_first": same, "active_experts": act,
                   "task_median_us": medians[name], "switches": steps[name].switches,
                   "kernel": kernels[name]}  # fmt: skip
            if probes[name]:
                row["probe_median_us"] = probes[name]
            rows.append(row)
            print(f"{g.name} B={B} {name:>12}: {ms[name]:.3f} ms ({row['vs_first']:.3f}x {first}), "
                  f"active experts {act}, rel err {max(rel.values(), default=0.0):.3g}, "
                  f"ids equal {min(same.values(), default=1.0):.3f}", flush=True)  # fmt: skip
            print(f"    task medians (us): {medians[name]}", flush=True)
            for code, ph in probes[name].items():
                print(f"    probes {code}: {ph}", flush=True)
        if a.layers is None and spec is not None:  # the compiler's prediction for the first variant's table
            routed = (active_experts(steps[first]) or {}).get("mean")
            check = cost_model_check(cfg, B, a.world_size, spec.solo(), max_seq, a.context, ms[first], routed)
            cost_checks[str(B)] = check
            print(format_check(str(B), check), flush=True)
        del steps
        torch.cuda.empty_cache()
        # after every token count: a run cut short keeps the counts it timed
        data = {"model": a.model, "world_size": a.world_size, "layers": a.layers, "context": a.context,
                "routing": a.routing, "tokens_timed": sorted({r["tokens"] for r in rows}), "rows": rows,
                "cost_model_check": cost_checks}  # fmt: skip
        path = write_result("step-variants", data, a.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
