"""Decode GEMV sweep on one GPU: the streaming GEMV's tilings (kernels/gemv.py) against torch bf16,
the old kernels and the copy bandwidth, standalone and as a persistent task stream.

    python benchmarks/gemv_sweep.py --list                # the kernels a run launches
    python benchmarks/gemv_sweep.py --precompile --jobs 2 # build them on a CPU (sm_90a) into the cache
    python benchmarks/gemv_sweep.py [--out DIR] [--budget-s 200] [--shapes q_proj,k_proj] [--m 1,8,16]

For every shape of gemv.PLAN_SHAPES and EXTRA_SHAPES and M in 1, 8, 16: torch's bf16 GEMV
(F.linear on bf16 weights), the old kernel (mxfp4_gemm / fp8_gemm GEMM), each GEMV variant
(`variants`: tile rows, split-K, ring depth, CTAs per SM) standalone and a few as a persistent
task stream (one CTA per SM looping over `copies` x tiles tasks: the rate a persistent step's
tasks would see), each task alone and with the next task's first chunks prefetched. Each
variant's output is checked against the float64 reference (NaN-poisoned) before it is timed; a
wrong one is reported, not timed. Timing: CUDA-graph replay of one call per
weight copy, rotating over enough copies that they never fit in L2, median of `--reps` replays.
Writes DIR/kernels-<device>.json and prints a table, then the gemv.TUNED lines of the winners.
"""

import argparse
import datetime
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilert.kernels import fp8_gemm, gemv, mxfp4_gemm  # noqa: E402
from tilert.kernels.common import cdiv  # noqa: E402

SWEEP_M = (1, 8, 16)
SMS = 132  # H100 SXM and H200; the stream kernels are compiled for this many CTAs
L2_TARGET = 200 << 20  # rotate over at least this many bytes of weights (L2: 50 MB)
TOL = 1e-3
# most important first (a run stops at its time budget): the plan's projections, the experts, the drafter fc
SHAPES = {**gemv.PLAN_SHAPES, **dict(sorted(gemv.EXTRA_SHAPES.items(), key=lambda kv: kv[1] == "drafter_fc"))}


def copies_for(nbytes: int) -> int:
    """Weight copies a timing rotates over: at least L2_TARGET bytes, 2..128 copies."""
    return max(2, min(128, cdiv(L2_TARGET, nbytes)))


def variants(fmt: str, m: int, n: int, k: int, sms: int = SMS) -> list[gemv.Config]:
    """The standalone tilings the sweep times: the cost model's best with 1, 2 and 4 CTAs per SM,
    its best without split-K, with rows of 16 and with rows >= 128, and the ring-depth neighbours
    (2, and the deepest that fits) of the 1-CTA pick. Deduplicated, the model's order."""
    cands = gemv.candidates(fmt, m, n, k, sms)
    key = lambda c: (gemv.model_time(c, sms), c.split, c.ctas, c.depth)  # noqa: E731
    picks = []
    for pred in (lambda c: c.ctas == 1, lambda c: c.ctas == 2, lambda c: c.ctas == 4, lambda c: c.split == 1,
                 lambda c: c.rows == 16, lambda c: c.rows >= 128):  # fmt: skip
        sub = [c for c in cands if pred(c)]
        if sub:
            picks.append(min(sub, key=key))
    if picks and picks[0].ctas == 1:
        one = picks[0]
        same = [c for c in cands if (c.wr, c.g, c.split, c.ctas) == (one.wr, one.g, one.split, one.ctas)]
        picks += [c for c in same if c.depth in (2, max(s.depth for s in same))]
    out = []
    for c in sorted(picks, key=key):
        if c not in out:
            out.append(c)
    return out


def stream_variants(fmt: str, m: int, n: int, k: int, sms: int = SMS) -> list[gemv.Config]:
    """Tilings for the persistent task stream (one CTA per SM): the 1-CTA picks whose tiles fill
    the SMs once and twice per weight copy, and the one without split-K (few large tasks per copy:
    the small k/v projections stream as a step would run them, beside other work)."""
    cands = [c for c in gemv.candidates(fmt, m, n, k, sms) if c.ctas == 1]
    key = lambda c: (gemv.model_time(c, sms), c.split, c.depth)  # noqa: E731
    out = []
    for pred in (lambda c: 0.7 * sms <= c.tiles <= sms, lambda c: 1.4 * sms <= c.tiles <= 2 * sms,
                 lambda c: c.split == 1):  # fmt: skip
        sub = [c for c in cands if pred(c)]
        if sub and min(sub, key=key) not in out:
            out.append(min(sub, key=key))
    return out or [min(cands, key=key)]


def old_config(fmt: str, m: int, n: int, k: int):
    return mxfp4_gemm.pick_config(m, n, k) if fmt == "mxfp4" else fp8_gemm.pick_config(m, n, k)


def kernel_list(shapes=None, ms=SWEEP_M, sms: int = SMS, tests: bool = True) -> list[tuple]:
    """Every kernel a sweep run launches, as build items: ("gemv", cfg), ("stream", cfg, copies,
    sms), ("old", fmt, cfg); with `tests`, also the GEMV GPU tests' kernels."""
    items = []
    for (fmt, n, k), name in SHAPES.items():
        if shapes and not set(name.split(",")) & set(shapes):
            continue
        w = gemv.Config(fmt, 1, n, k).weight_bytes
        for m in ms:
            items += [("gemv", c) for c in variants(fmt, m, n, k, sms)]
            for c in stream_variants(fmt, m, n, k, sms):
                items += [
                    ("stream", c, copies_for(w), sms, pf) for pf in (False, True) if not pf or gemv.prefetch_ok(c)
                ]
            items.append(("old", fmt, old_config(fmt, m, n, k)))
    if tests:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
        import test_gemv as tg

        cfgs = set(tg.ODD) | {gemv.pick_config(f, m, n, k) for (f, n, k) in tg.SHAPES for m in tg.TEST_M}
        cfgs |= {gemv.pick_config(f, m, 136, 32 * 37) for f in ("mxfp4", "fp8") for m in (1, 3, 7, 16)}
        cfgs |= {gemv.pick_config("mxfp4", 8, 256, 1024)} | {
            gemv.pick_config(f, 3, 256, 1024) for f in ("mxfp4", "fp8")
        }
        items += [("gemv", c) for c in cfgs]
        items += [("stream", c, tg.stream_copies(c), sms, pf) for c in tg.STREAM for pf in (False, True)]
        items += [
            ("old", "mxfp4", mxfp4_gemm.pick_config(3, 256, 1024)),
            ("old", "fp8", fp8_gemm.pick_config(3, 256, 1024)),
        ]
    seen, out = set(), []
    for it in items:
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out


def build_item(item: tuple) -> str:
    """Compile one kernel of kernel_list into the cache (a worker process)."""
    t0 = time.time()
    if item[0] == "gemv":
        gemv.compiled(item[1])
    elif item[0] == "stream":
        gemv.compiled_stream(*item[1:])
    else:
        (mxfp4_gemm if item[1] == "mxfp4" else fp8_gemm).compiled(item[2])
    return f"{item[0]} {item[-1] if item[0] == 'old' else item[1]}: {time.time() - t0:.1f} s"


def precompile(items: list[tuple], jobs: int) -> None:
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn")) as pool:
        for i, line in enumerate(pool.map(build_item, items), 1):
            print(f"[{i}/{len(items)}] {line}", flush=True)


# --- the GPU run -------------------------------------------------------------------------------


def _inputs(fmt: str, n: int, k: int, copies: int, seed: int, device: str):
    """`copies` independent quantised weights (w, s) and their bf16 dequantisation (for torch)."""
    import torch

    from tilert.numerics import fp8, mxfp4

    g = torch.Generator(device=device)
    g.manual_seed(seed)
    qs, bf = [], []
    for _ in range(copies):
        wf = torch.randn(n, k, device=device, generator=g) * 0.05
        q = mxfp4.quantize(wf) if fmt == "mxfp4" else fp8.quantize_blocks(wf)
        qs.append(q)
        del wf
    for c in range(copies_for(2 * n * k)):  # bf16 weights are 2-4x the bytes: their own rotation
        w, s = qs[c % copies]
        deq = mxfp4.dequantize if fmt == "mxfp4" else fp8.dequantize_blocks
        bf.append(deq(w, s, dtype=torch.bfloat16))
    return qs, bf


def _time(calls: list, reps: int) -> float:
    from benchmarks.common import time_graph

    return time_graph(calls, reps=reps)[0]


def _stream_check_and_time(cfg: gemv.Config, qs: list, xs: list, ref, copies: int, sms: int, reps: int, prefetch: bool):
    """(largest rel err of copies 0 and last, seconds per GEMV) of the persistent task stream over
    `copies` copies (with prefetch: each task issues the next one's first chunks)."""
    import torch

    from tilert.kernels.views import pointer_row

    specs = gemv.views(cfg)
    dev = xs[0].device
    tensors = []
    for c in range(copies):
        t = {"x": xs[c], "w": qs[c][0], "s": qs[c][1]}
        t["y"] = torch.full((cfg.m, cfg.n), float("nan"), device=dev, dtype=getattr(torch, cfg.out_dtype))
        if cfg.split > 1:
            t["ws"] = torch.full((cfg.split, cfg.m, cfg.n), float("nan"), device=dev)
            t["cnt"] = torch.zeros(cfg.n_tiles, dtype=torch.int32, device=dev)
        tensors.append(t)
    ptrs = torch.cat([pointer_row([t[nm] for nm, _, _ in specs], specs, "stream") for t in tensors]).to(dev)
    kern = gemv.compiled_stream(cfg, copies, sms, prefetch)
    kern(ptrs)
    ref_last = gemv.reference(cfg.fmt, xs[copies - 1], *qs[copies - 1])
    err = max(gemv.rel_err(tensors[0]["y"], ref), gemv.rel_err(tensors[-1]["y"], ref_last))
    if err >= TOL:
        return err, None
    return err, _time([lambda: kern(ptrs)], reps) / copies


def sweep_shape(
    fmt: str, n: int, k: int, name: str, ms, bw: float, sms: int, reps: int, deadline: float, device: str = "cuda"
) -> list[dict]:
    """The records of one weight shape, one per M (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    w_bytes = gemv.Config(fmt, 1, n, k).weight_bytes
    copies = copies_for(w_bytes)
    qs, bf = _inputs(fmt, n, k, copies, seed=n * 7 + k, device=device)
    out = []
    for m in ms:
        xs = [torch.randn(m, k, device=device).to(torch.bfloat16) for _ in range(max(copies, len(bf)))]
        ref = gemv.reference(fmt, xs[0], *qs[0])
        floor = w_bytes / bw
        rec = dict(fmt=fmt, shape=name, n=n, k=k, m=m, weight_bytes=w_bytes, copies=copies, floor_us=floor * 1e6)
        t_bf = _time([lambda c=c, xs=xs: F.linear(xs[c], bf[c]) for c in range(len(bf))], reps)
        rec["torch_bf16_us"] = t_bf * 1e6
        rec["torch_bf16_frac_copy_bw"] = 2 * n * k / t_bf / bw
        try:  # the old kernel (x padded to its block, y zeroed when split): as benchmarks/kernels.py
            oc = old_config(fmt, m, n, k)
            kern = (mxfp4_gemm if fmt == "mxfp4" else fp8_gemm).compiled(oc)
            xp = [torch.zeros(oc.m, k, dtype=torch.bfloat16, device=device) for _ in range(copies)]
            for c in range(copies):
                xp[c][:m] = xs[c]
            yo = [torch.zeros(oc.m, n, device=device) for _ in range(copies)]
            split = oc.split_k > 1

            def old(c, kern=kern, xp=xp, yo=yo, split=split):
                if split:
                    yo[c].zero_()
                kern(xp[c], qs[c][0], qs[c][1], yo[c])

            old(0)
            rec["old_err"] = gemv.rel_err(yo[0][:m], ref)
            rec["old_us"] = _time([lambda c=c: old(c) for c in range(copies)], reps) * 1e6
            rec["old_cfg"] = repr(oc)
        except Exception as e:  # noqa: BLE001 - report and go on
            rec["old_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rec["variants"] = []
        streams = stream_variants(fmt, m, n, k, sms)
        for launcher, cfgs in (
            ("standalone", variants(fmt, m, n, k, sms)),
            ("stream", streams),
            ("stream+prefetch", [c for c in streams if gemv.prefetch_ok(c)]),
        ):
            for cfg in cfgs:
                v = dict(launcher=launcher, cfg=repr(cfg), tiling=(cfg.wr, cfg.g, cfg.split, cfg.depth, cfg.ctas),
                         model_us=gemv.model_time(cfg, sms, bw) * 1e6)  # fmt: skip
                if time.time() > deadline:
                    v["skipped"] = "time budget"
                    rec["variants"].append(v)
                    continue
                print(f"  {name} M={m} {launcher} {v['tiling']}: ", end="", flush=True)  # names a variant that faults
                try:
                    if launcher == "standalone":
                        y = torch.full((m, n), float("nan"), device=device)
                        if cfg.split > 1:
                            gemv.workspace(cfg, y.device)[0].fill_(float("nan"))
                        gemv.launch(cfg, xs[0], *qs[0], y)
                        v["err"] = gemv.rel_err(y, ref)
                        if v["err"] < TOL:
                            calls = [lambda c=c, cfg=cfg, xs=xs: gemv.launch(cfg, xs[c], *qs[c]) for c in range(copies)]
                            t = _time(calls, reps)
                        else:
                            t = None
                    else:
                        pf = launcher == "stream+prefetch"
                        v["err"], t = _stream_check_and_time(cfg, qs, xs, ref, copies, sms, reps, pf)
                except Exception as e:  # noqa: BLE001 - a variant that fails to load or run is reported
                    v["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    t = None
                if t is not None:
                    v.update(
                        t_us=t * 1e6, gbps=w_bytes / t / 1e9, frac_copy_bw=w_bytes / t / bw, vs_torch_bf16=t_bf / t
                    )
                elif "error" not in v and "skipped" not in v:
                    v["wrong"] = True
                rec["variants"].append(v)
                what = v.get("error") or v.get("skipped") or f"WRONG err {v.get('err')}"
                if "t_us" in v:
                    what = f"{v['t_us']:.2f} us, {v['frac_copy_bw']:.0%} of copy bw"
                print(what, flush=True)
        for best, kinds in (("best_standalone", ("standalone",)), ("best_stream", ("stream", "stream+prefetch"))):
            timed = [v for v in rec["variants"] if v["launcher"] in kinds and "t_us" in v]
            if timed:
                rec[best] = min(timed, key=lambda v: v["t_us"])
        out.append(rec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the kernels a run launches")
    ap.add_argument("--precompile", action="store_true", help="build them into the kernel cache (no GPU)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--no-tests", action="store_true", help="precompile: skip the GEMV GPU tests' kernels")
    ap.add_argument("--shapes", default="", help="comma-separated names of SHAPES (default: all)")
    ap.add_argument("--m", default=",".join(map(str, SWEEP_M)))
    ap.add_argument("--sms", type=int, default=SMS)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=180.0, help="time no more variants or shapes after this long")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--isolate", action="store_true", help="each shape in its own process (after a kernel fault)")
    a = ap.parse_args()
    shapes = [s for s in a.shapes.split(",") if s]
    ms = tuple(int(v) for v in a.m.split(","))
    if a.list or a.precompile:
        items = kernel_list(shapes, ms, a.sms, tests=not a.no_tests)
        if a.list:
            for it in items:
                print(*it)
            print(f"{len(items)} kernels")
        if a.precompile:
            precompile(items, a.jobs)
        return
    run(shapes, ms, a.sms, a.reps, a.budget_s, Path(a.out), isolate=a.isolate)


def run(
    shapes: list[str],
    ms: tuple[int, ...],
    sms: int,
    reps: int,
    budget_s: float,
    out_dir: Path,
    device: str = "cuda",
    isolate: bool = False,
) -> Path:
    """Measure, write out_dir/kernels-<device>.json, print the table (device "cpu": the tests'
    stand-in kernels and timer). isolate: each shape in its own process."""
    import torch

    from benchmarks import common

    t0 = time.time()
    cuda = device == "cuda"
    dev_sms = torch.cuda.get_device_properties(0).multi_processor_count if cuda else sms
    if dev_sms != sms:
        print(f"note: this GPU has {dev_sms} SMs; the stream kernels run {sms} CTAs (compiled for --sms {sms})")
    rates = common.copy_bandwidths()
    bw = max(rates.values())
    print(
        f"copy bandwidth {bw / 1e12:.3f} TB/s (read + write); "
        + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in rates.items())
    )
    if cuda:
        torch.cuda.empty_cache()
    deadline = t0 + budget_s
    dev_name = torch.cuda.get_device_name() if cuda else device
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"kernels-{dev_name.replace(' ', '-').lower()}.json"
    results: list[dict] = []

    def write() -> dict:  # after every shape: a run cut short (a fault, the time limit) keeps what it measured
        doc = dict(
            device=dev_name,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            commit=common.git_commit(),
            torch=torch.__version__,
            sms=dev_sms,
            copy_bw_tbps=bw / 1e12,
            copy_bw_methods_tbps={k: v / 1e12 for k, v in rates.items()},
            wall_s=time.time() - t0,
            gemv=results,
        )
        path.write_text(json.dumps(keep_other_run(path, doc, "results"), indent=1))
        return doc

    for (fmt, n, k), name in SHAPES.items():
        if shapes and not set(name.split(",")) & set(shapes):
            continue
        if time.time() > deadline:
            results.append(dict(fmt=fmt, shape=name, n=n, k=k, error="skipped: time budget"))
            continue
        print(f"{name} ({fmt} {n} x {k})", flush=True)
        args = (fmt, n, k, name, ms, bw, sms, reps, deadline, device)
        try:
            if isolate:  # a fresh process (and CUDA context) per shape: a faulting kernel costs one shape
                with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                    results += pool.submit(sweep_shape, *args).result()
            else:
                results += sweep_shape(*args)
        except Exception as e:  # noqa: BLE001 - keep the other shapes
            import traceback

            traceback.print_exc()
            results.append(dict(fmt=fmt, shape=name, n=n, k=k, error=f"{type(e).__name__}: {str(e)[:300]}"))
        write()
    doc = write()
    print_table(doc)
    print("wrote", path)
    return path


def keep_other_run(path: Path, doc: dict, key: str) -> dict:
    """doc plus section `key` of the results file already at path (benchmarks/kernels.py's
    "results", or this sweep's "gemv"), with that run's date, commit and copy bandwidth under
    key + "_run": both benchmarks write kernels-<device>.json without dropping the other's figures."""
    if path.exists():
        old = json.loads(path.read_text())
        if key in old:
            doc[key] = old[key]
            doc[key + "_run"] = old.get(key + "_run") or {f: old.get(f) for f in ("date", "commit", "copy_bw_tbps")}
    return doc


def print_table(doc: dict) -> None:
    print(f"\ncopy bw {doc['copy_bw_tbps']:.2f} TB/s on {doc['device']}; frac = weight bytes / time / copy bw")
    print(f"{'shape':16} {'M':>2} {'bf16 us':>8} {'old us':>7} {'gemv us':>8} {'frac':>5} {'x bf16':>6} "
          f"{'stream us':>9} {'frac':>5}  tiling (wr, g, split, depth, ctas)")  # fmt: skip
    tuned = []
    for r in doc["gemv"]:
        if "error" in r:
            print(f"{r['shape'][:16]:16} ERROR {r['error'][:100]}")
            continue
        b, s = r.get("best_standalone"), r.get("best_stream")
        print(f"{r['shape'][:16]:16} {r['m']:2} {r['torch_bf16_us']:8.2f} {r.get('old_us', float('nan')):7.2f} "
              f"{b['t_us'] if b else float('nan'):8.2f} {b['frac_copy_bw'] if b else 0:5.0%} "
              f"{b['vs_torch_bf16'] if b else 0:6.2f} {s['t_us'] if s else float('nan'):9.2f} "
              f"{s['frac_copy_bw'] if s else 0:5.0%}  {tuple(b['tiling']) if b else '-'}")  # fmt: skip
        bad = [v["tiling"] for v in r["variants"] if v.get("wrong") or "error" in v]
        if bad:
            print(f"{'':19} WRONG or failed: {bad}")
        if b:
            tuned.append(f"    ({r['fmt']!r}, {r['n']}, {r['k']}, {r['m']}): {tuple(b['tiling'])},")
    print("\ngemv.TUNED entries (fastest standalone tiling per shape and M):")
    print("\n".join(tuned))


if __name__ == "__main__":
    main()
