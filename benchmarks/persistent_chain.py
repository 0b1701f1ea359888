"""Persistent vs eager on a chain of MXFP4 layers (the persistent machinery's test bed).

One run, side by side, median of many: the persistent kernel (1 launch per step), the eager
runtime (one launch per op), the eager step captured in a CUDA graph, and the bandwidth floor
(weight bytes at the copy bandwidth measured in the same run). Writes
benchmarks/results/persistent-chain-<device>.json.

    python benchmarks/persistent_chain.py [--layers 8 16] [--m 1 8] [--n 6144] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from tilert.abi import FIELD, OPCODES
from tilert.kernels import mxfp4_gemm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import copy_bandwidth, time_cuda, write_result  # noqa: E402
from tilert.numerics import mxfp4  # noqa: E402
from tilert.runtime.persistent import chain  # noqa: E402


def task_times(pk: chain.PersistentChain) -> dict:
    """Median body time (ready -> end) and wait (start -> ready) of the GEMM tasks in the last
    launch's per-task trace: the body alone, whatever the dependencies cost."""
    pk.launch(torch.zeros(1, pk.spec.n, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.synchronize()
    tr, ops = pk.trace.cpu().numpy(), pk.tasks.cpu().numpy()[:, :, FIELD["opcode"]]
    sel = ops == OPCODES[chain.GEMM]
    run, wait = (tr[:, :, 1] - tr[:, :, 2])[sel], (tr[:, :, 2] - tr[:, :, 0])[sel]
    return {"gemm_task_us": float(np.median(run)) / 1e3, "gemm_wait_us": float(np.median(wait)) / 1e3}


def bench(layers: int, m: int, n: int, bw: float, queues: int = 132) -> dict:
    spec = chain.ChainSpec(layers=layers, m=m, n=n, num_sms=queues)
    W, S = mxfp4.quantize(torch.randn(layers, n, n, device="cuda") * n**-0.5)
    x = torch.randn(m, n, device="cuda").to(torch.bfloat16)
    pk = chain.PersistentChain(spec, W, S)
    y = pk(x).float()
    ref = chain.reference(x, W, S).float()
    err = float((y - ref).norm() / ref.norm())
    t_pk = time_cuda(lambda: pk.launch(x))
    pk.check()
    body = task_times(pk)
    t_eager = time_cuda(lambda: chain.eager_chain(x, W, S, spec))
    g = torch.cuda.CUDAGraph()
    chain.eager_chain(x, W, S, spec)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        chain.eager_chain(x, W, S, spec)
    t_graph = time_cuda(g.replay)
    wbytes = W.numel() + S.numel()
    floor = wbytes / bw * 1e3
    row = {
        "layers": layers,
        "m": m,
        "n": n,
        "rel_err": err,
        "weight_bytes": wbytes,
        "persistent_ms": t_pk,
        "eager_ms": t_eager,
        "eager_graph_ms": t_graph,
        "floor_ms": floor,
        "launches_per_step": {"persistent": 1, "eager": 3 * layers},
        "persistent_vs_eager": t_eager / t_pk,
        "persistent_vs_graph": t_graph / t_pk,
        "persistent_over_floor": t_pk / floor,
        "gemm_config": repr(spec.gemm),
        "queues": queues,
        **body,
    }
    print(
        f"Q={queues} L={layers:3d} M={m:2d} N={n}: persistent {t_pk:.3f} ms | eager {t_eager:.3f} | "
        f"graph {t_graph:.3f} | "
        f"floor {floor:.3f} | x{t_eager / t_pk:.2f} vs eager, x{t_graph / t_pk:.2f} vs graph, "
        f"{t_pk / floor:.2f}x floor, err {err:.1e}; a GEMM task runs {body['gemm_task_us']:.1f} us "
        f"(median, waits excluded) and waits {body['gemm_wait_us']:.1f} us",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--n", type=int, default=6144)
    ap.add_argument("--queues", type=int, nargs="+", default=[132], help="task queues (CTAs); >132 = several per SM")
    ap.add_argument("--out", default=None)
    ap.add_argument("--precompile", action="store_true", help="only build the kernels (no GPU needed)")
    a = ap.parse_args()
    if a.precompile:
        for q in a.queues:
            for L in a.layers:
                for m in a.m:
                    chain.build_chain(chain.ChainSpec(layers=L, m=m, n=a.n, num_sms=q))
                    mxfp4_gemm.compiled(chain.ChainSpec(layers=L, m=m, n=a.n, num_sms=q).gemm)
        return
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = [bench(L, m, a.n, bw, q) for q in a.queues for L in a.layers for m in a.m]
    print(write_result("persistent-chain", {"copy_bandwidth_Bps": bw, "rows": rows}, a.out))


if __name__ == "__main__":
    main()
