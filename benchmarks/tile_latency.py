"""How long one MXFP4 GEMV tile takes when it runs alone on its SM (the persistent kernel's case: one
CTA per SM, tiles back to back) against several co-resident CTAs per SM (the eager kernels' case).

Each configuration is the standalone `mxfp4_gemm` kernel at M = 1 with N = 16 x 132 x r rows (r tiles
per SM, all launched at once), replayed from a CUDA graph; per-tile time = step time / r. If a tile
alone costs far more than its bytes at the SM's share of bandwidth, the body is latency-bound and
the persistent kernel needs more loads in flight per tile (or several tiles at once), not L2
prefetch. Writes benchmarks/results/tile-latency-<device>.json.

    python benchmarks/tile_latency.py [--k 6144] [--per-sm 1 2 4] [--cold-gb 40] [--precompile]

--cold-gb: the same launches over fresh weights each time (a pool of that size), as the decode step
reads them: tells latency of the body from the cost of cold L2 and TLB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import copy_bandwidth, time_graph, write_result
from tilert.kernels.common import build
from tilert.numerics import mxfp4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tilert.kernels import mxfp4_gemm as mx  # noqa: E402

SMS = 132
SHAPES = [(256, 6), (256, 3), (256, 8), (128, 6)]  # (threads, stages: k chunks in flight per warp)


def configs(k: int, per_sm: list[int]) -> list[tuple[int, mx.Config]]:
    return [(r, mx.Config(8, 16 * SMS * r, k, 8, 16, 128, 1, stages, threads, 1))
            for r in per_sm for threads, stages in SHAPES]  # fmt: skip


def padded_kernel(c: mx.Config, pad_kb: int):
    """The standalone tile kernel beside `pad_kb` KB more dynamic shared memory, as a CTA of the
    persistent kernel holds (its largest body's buffers), leaving the SM that much less L1."""
    return build(mx.make_kernel(c, extra_shared_kb=pad_kb))


PADS = [100, 200]  # KB of extra shared memory (the persistent step kernel holds about 216 KB)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=6144)
    ap.add_argument("--per-sm", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--precompile", action="store_true", help="only build the kernels (no GPU needed)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cold-gb", type=float, default=0,
                    help="also time each config over fresh weights every launch, spread over this many GB")
    a = ap.parse_args()
    cfgs = configs(a.k, a.per_sm)
    if a.precompile:
        for _, c in cfgs:
            mx.compiled(c)
        for kb in PADS:
            padded_kernel(cfgs[0][1], kb)
        print(f"built {len(cfgs) + len(PADS)} kernels")
        return

    bw = copy_bandwidth()
    rows = []
    for r, c in cfgs:
        w = torch.randn(c.n, c.k, device="cuda") * 0.05
        blocks, scales = mxfp4.quantize(w)
        x = torch.zeros(c.m, c.k, dtype=torch.bfloat16, device="cuda")
        x[0] = torch.randn(c.k, device="cuda").to(torch.bfloat16)
        y = torch.empty(c.m, c.n, device="cuda")
        kern = mx.compiled(c)
        kern(x, blocks, scales, y)
        ref = mx.reference(x[:1], blocks, scales).double()
        err = float((y[:1].double() - ref).norm() / ref.norm())
        sec, how = time_graph([lambda k_=kern, a=(x, blocks, scales, y): k_(*a)], iters=10)
        nbytes = blocks.nbytes + scales.nbytes
        row = {"tiles_per_sm": r, "threads": c.threads, "stages": c.stages, "k": c.k, "n": c.n,
               "step_us": sec * 1e6, "us_per_tile": sec * 1e6 / r, "bytes_per_tile": nbytes // (c.n // 16),
               "floor_us": nbytes / bw * 1e6, "rel_err": err, "timing": how}  # fmt: skip
        if a.cold_gb:  # every launch reads weights no launch before it touched (L2- and TLB-cold)
            sets = max(2, int(a.cold_gb * 1e9 // nbytes))
            pool = torch.empty(sets, *blocks.shape, dtype=torch.uint8, device="cuda")
            pool[:] = blocks
            calls = [lambda k_=kern, a=(x, pool[i], scales, y): k_(*a) for i in range(sets)]
            sec_c, _ = time_graph(calls, iters=1, reps=3)
            row.update(cold_us_per_tile=sec_c * 1e6 / r, cold_sets=sets)
            del pool, calls
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"r={r} threads={c.threads} stages={c.stages}: {row['step_us']:.1f} us per launch, "
              f"{row['us_per_tile']:.1f} us per tile-slot, floor {row['floor_us']:.1f} us, err {err:.1e}"
              + (f", cold weights {row['cold_us_per_tile']:.1f} us per tile-slot" if a.cold_gb else ""), flush=True)
    c = cfgs[0][1]  # one tile per SM, 256 threads, 6 chunks in flight per warp
    w = torch.randn(c.n, c.k, device="cuda") * 0.05
    blocks, scales = mxfp4.quantize(w)
    x = torch.randn(c.m, c.k, device="cuda").to(torch.bfloat16)
    y = torch.empty(c.m, c.n, device="cuda")
    ref = mx.reference(x, blocks, scales).double()
    for kb in PADS:
        kern = padded_kernel(c, kb)
        kern(x, blocks, scales, y)
        err = float((y[:1].double() - ref[:1]).norm() / ref[:1].norm())
        sec, how = time_graph([lambda k_=kern: k_(x, blocks, scales, y)], iters=10)
        rows.append({"tiles_per_sm": 1, "threads": c.threads, "stages": c.stages, "k": c.k, "n": c.n,
                     "extra_shared_kb": kb, "us_per_tile": sec * 1e6, "rel_err_row0": err, "timing": how})  # fmt: skip
        print(f"r=1 threads={c.threads} stages={c.stages} + {kb} KB shared: {sec * 1e6:.1f} us per tile, "
              f"err {err:.1e}", flush=True)
    print(write_result("tile-latency", {"sms": SMS, "copy_bandwidth_Bps": bw, "rows": rows}, a.out))


if __name__ == "__main__":
    main()
