"""Decode kernels side by side on one GPU: MXFP4 GEMM, FP8 GEMM, fused MoE vs torch and vs floors,
and the step's GEMV expert tasks with each weight load path (TILERT_MOE_LOADS) vs their floor.
(The streaming GEMV that runs M <= 16: benchmarks/gemv_sweep.py, into the same results file.)

    python benchmarks/kernels.py --precompile        # build every test/bench config in parallel
    python benchmarks/kernels.py --out DIR           # time; writes DIR/kernels-<device>.json

Timing: CUDA graphs of R calls over R rotated input sets (weights > 2x L2 in total), replayed;
median over repeats, per call. Floors: bytes that must move / device-to-device copy bandwidth
measured in the same run (read + write bytes / time).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import test_fp8_gemm as tf
import test_mxfp4_gemm as tm

from tilert.numerics import fp8, mxfp4

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import copy_bandwidths, time_graph  # noqa: E402
from benchmarks.gemv_sweep import keep_other_run  # noqa: E402
from tilert.kernels import fp8_gemm, moe, mxfp4_gemm, switches  # noqa: E402
from tilert.kernels.common import build  # noqa: E402

L2_BYTES = 60 << 20


def _build_one(item):
    mod, cfg = item
    fs = moe.make_kernels(cfg) if mod == "moe" else [sys.modules[f"tilert.kernels.{mod}"].make_kernel(cfg)]
    for f in fs:
        build(f)
    return repr(cfg)


def precompile():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))

    items = {("mxfp4_gemm", mxfp4_gemm.pick_config(*s)) for s in tm.ODD + tm.MIMO}
    items |= {("fp8_gemm", fp8_gemm.pick_config(*s)) for s in tf.ODD + tf.MIMO}
    for m in (1, 8, 16):
        items |= {("mxfp4_gemm", mxfp4_gemm.pick_config(m, n, k)) for n, k in mxfp4_gemm.MIMO_SHAPES.values()}
        items |= {("fp8_gemm", fp8_gemm.pick_config(m, *fp8_gemm.MIMO_SHAPES[n])) for n in fp8_gemm.PLAN_SHAPES}
    mm = moe.MIMO
    for t in (1, 5, 16):
        items.add(("moe", moe.Config(t, 512, 512, 32, 32, 8)))
    items.add(("moe", moe.Config(8, 512, 512, 64, 16, 6, 16)))
    for t in (1, 8):
        items.add(("moe", moe.Config(t, mm["hidden"], mm["inter"], mm["n_experts"], mm["n_local"], mm["top_k"])))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as ex:
        for r in ex.map(_build_one, sorted(items, key=repr)):
            print("built", r, flush=True)
    for t, _ in EXPERT_CASES:
        for loads in moe.LOADS:
            print("built", expert_tasks(t, loads)[2], flush=True)


def graph_time(calls, reps=30):
    """Median seconds per call of a list of zero-arg callables, replayed as one CUDA graph."""
    return time_graph(calls, reps=reps)


def copy_bw(gib: int = 2):
    """(ceiling, {method: rate}) of the device-to-device copy, bytes read + written per second."""
    rates = copy_bandwidths(gib)
    return max(rates.values()), rates


def n_rot(bytes_per_set):
    return max(2, min(16, -(-3 * L2_BYTES // bytes_per_set)))


def bench_mxfp4(bw, res):
    for name, (n, k) in mxfp4_gemm.MIMO_SHAPES.items():
        wbytes = n * k // 2 + n * k // 32
        r = n_rot(wbytes)
        ws = [mxfp4.quantize(torch.randn(n, k, device="cuda") * 0.05) for _ in range(r)]
        wbf = [mxfp4.dequantize(b, s, dtype=torch.bfloat16) for b, s in ws]
        for m in (1, 8, 16):
            cfg = mxfp4_gemm.pick_config(m, n, k)
            kern = mxfp4_gemm.compiled(cfg)
            xs = [torch.randn(cfg.m, k, device="cuda").to(torch.bfloat16) for _ in range(r)]
            ys = [torch.empty(cfg.m, n, device="cuda") for _ in range(r)]

            def ours(i, kern=kern, xs=xs, ys=ys, ws=ws, split=cfg.split_k > 1):
                if split:
                    ys[i].zero_()
                kern(xs[i], ws[i][0], ws[i][1], ys[i])

            t_ours, mode = graph_time([lambda i=i: ours(i) for i in range(r)])
            xb = [x[:m] for x in xs]
            t_bf16, _ = graph_time([lambda i=i, xb=xb, wbf=wbf: torch.matmul(xb[i], wbf[i].t()) for i in range(r)])
            floor = (wbytes + m * k * 2 + m * n * 4) / bw
            res.append(
                dict(
                    kernel="mxfp4_gemm",
                    shape=name,
                    m=m,
                    n=n,
                    k=k,
                    cfg=repr(cfg),
                    mode=mode,
                    t_us=t_ours * 1e6,
                    torch_bf16_us=t_bf16 * 1e6,
                    floor_us=floor * 1e6,
                    weight_read_tbps=wbytes / t_ours / 1e12,
                    frac_of_copy_bw=wbytes / t_ours / bw,
                    speedup_vs_bf16=t_bf16 / t_ours,
                    over_floor=t_ours / floor,
                )
            )
            print(res[-1], flush=True)


def bench_fp8(bw, res):
    for name in fp8_gemm.PLAN_SHAPES:
        n, k = fp8_gemm.MIMO_SHAPES[name]
        wbytes = n * k + 4 * (-(-n // 128)) * (-(-k // 128))
        r = n_rot(wbytes)
        ws = [fp8.quantize_blocks(torch.randn(n, k, device="cuda") * 0.05) for _ in range(r)]
        wbf = [fp8.dequantize_blocks(q, s, dtype=torch.bfloat16) for q, s in ws]
        srow = torch.ones(1, n, device="cuda")
        for m in (1, 8, 16):
            cfg = fp8_gemm.pick_config(m, n, k)
            kern = fp8_gemm.compiled(cfg)
            xs = [torch.randn(cfg.m, k, device="cuda").to(torch.bfloat16) for _ in range(r)]
            ys = [torch.empty(cfg.m, n, device="cuda") for _ in range(r)]

            def ours(i, kern=kern, xs=xs, ys=ys, ws=ws, split=cfg.split_k > 1):
                if split:
                    ys[i].zero_()
                kern(xs[i], ws[i][0], ws[i][1], ys[i])

            t_ours, mode = graph_time([lambda i=i: ours(i) for i in range(r)])
            xb = [x[:m] for x in xs]
            t_bf16, _ = graph_time([lambda i=i, xb=xb, wbf=wbf: torch.matmul(xb[i], wbf[i].t()) for i in range(r)])
            t_sc = None
            try:  # fp8 x fp8 with row-wise scales (activation padded to 16 rows); timing only
                x8 = [x.to(torch.float8_e4m3fn) for x in xs]
                sa = torch.ones(cfg.m, 1, device="cuda")
                t_sc, _ = graph_time(
                    [
                        lambda i=i, x8=x8, ws=ws, sa=sa, srow=srow: torch._scaled_mm(
                            x8[i], ws[i][0].t(), sa, srow, out_dtype=torch.bfloat16
                        )
                        for i in range(r)
                    ]
                )
            except Exception as e:
                print("scaled_mm:", str(e)[:160])
            floor = (wbytes + m * k * 2 + m * n * 4) / bw
            res.append(
                dict(
                    kernel="fp8_gemm",
                    shape=name,
                    m=m,
                    n=n,
                    k=k,
                    cfg=repr(cfg),
                    mode=mode,
                    t_us=t_ours * 1e6,
                    torch_bf16_us=t_bf16 * 1e6,
                    scaled_mm_rowwise_us=t_sc and t_sc * 1e6,
                    floor_us=floor * 1e6,
                    weight_read_tbps=wbytes / t_ours / 1e12,
                    frac_of_copy_bw=wbytes / t_ours / bw,
                    speedup_vs_bf16=t_bf16 / t_ours,
                    over_floor=t_ours / floor,
                )
            )
            print(res[-1], flush=True)


def torch_moe(x, rw, b, wbf, top_k, n_local):
    """Loop over the active local experts with bf16 weights (host sync for the expert list)."""
    logits = x.float() @ rw.t()
    idx, w = moe.route(logits, b, top_k=top_k)
    out = torch.zeros(x.shape[0], x.shape[1], device="cuda")
    for e in torch.unique(idx).tolist():
        if e >= n_local:
            continue
        tok, slot = (idx == e).nonzero(as_tuple=True)
        gu = x[tok] @ wbf[0][e].t()
        g, u = gu.float().chunk(2, dim=-1)
        h = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
        out.index_add_(0, tok, (h @ wbf[1][e].t()).float() * w[tok, slot, None])
    return out


def bench_moe(bw, res):
    mm = moe.MIMO
    H, In, E, EL, K = mm["hidden"], mm["inter"], mm["n_experts"], mm["n_local"], mm["top_k"]
    _, _, _, gu, dn = moe.make_inputs(1, H, In, E, EL, seed=1)
    wbf = (mxfp4.dequantize(*gu, dtype=torch.bfloat16), mxfp4.dequantize(*dn, dtype=torch.bfloat16))
    ebytes = sum(t[0].numel() + t[1].numel() for t in (gu, dn)) // EL
    for t in (1, 8):
        cfg = moe.Config(t, H, In, E, EL, K)
        r = 8
        sets = [moe.make_inputs(t, H, In, E, 1, seed=100 + i)[:3] for i in range(r)]
        t_ours, mode = graph_time([lambda s=s, cfg=cfg: moe.run(*s, gu, dn, top_k=K, cfg=cfg) for s in sets])
        floors, floors_nr, active = [], [], []
        for x, rw, b in sets:
            idx, _ = moe.route(x.float() @ rw.t(), b, top_k=K)
            a = int((torch.unique(idx) < EL).sum())
            active.append(a)
            act = t * H * 2 + t * H * 4
            floors.append((a * ebytes + rw.numel() * 4 + act) / bw)
            floors_nr.append((a * ebytes + act) / bw)
        ts = []
        for x, rw, b in sets:
            torch_moe(x, rw, b, wbf, K, EL)
        torch.cuda.synchronize()
        for _ in range(5):
            a_, b_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a_.record()
            for x, rw, b in sets:
                torch_moe(x, rw, b, wbf, K, EL)
            b_.record()
            b_.synchronize()
            ts.append(a_.elapsed_time(b_) / 1e3 / r)
        t_torch = statistics.median(ts)
        fl, fl_nr = statistics.mean(floors), statistics.mean(floors_nr)
        res.append(
            dict(
                kernel="fused_moe",
                t=t,
                mode=mode,
                active_local_experts=active,
                t_us=t_ours * 1e6,
                torch_loop_us=t_torch * 1e6,
                floor_us=fl * 1e6,
                floor_no_router_us=fl_nr * 1e6,
                over_floor=t_ours / fl,
                over_floor_no_router=t_ours / fl_nr,
                speedup_vs_torch=t_torch / t_ours,
            )
        )
        print(res[-1], flush=True)


EXPERT_CASES = [(1, 1), (8, 7)]  # (tokens, active local experts): decode and a verify block by token


def expert_tasks(t: int, loads: str):
    """The persistent step's GEMV expert tasks at the mimo rank shape as standalone launches (one CTA
    a task, `moe.make_gemv_task_kernels`) with TILERT_MOE_LOADS=`loads`: (gate/up, down, tiling)."""
    mm = moe.MIMO
    H, In, EL, K = mm["hidden"], mm["inter"], mm["n_local"], mm["top_k"]
    with switches.applied({moe.LOADS_ENV: loads}):
        til = moe.tiling(t, H, In, EL, K, body="gemv")
    return (*moe.compiled_gemv_tasks(moe.Config(t, H, In, EL, EL, K), til), til.gemv)


def bench_experts(bw, res):
    """The GEMV expert tasks (gate/up then down over `active` experts) with each weight load path,
    against the active experts' bytes at copy bandwidth: the expert bodies alone, outside the step.
    Consecutive calls take other experts (the 48 experts' 0.9 GB rotate through L2)."""
    mm = moe.MIMO
    H, In, EL = mm["hidden"], mm["inter"], mm["n_local"]
    dev = "cuda"
    # random E2M1 codes; scale codes near 1.0 (2^-9 .. 2^0), as real checkpoints have: codes > 128 take
    # the body's slower two-multiply path, which random bytes would hit in half the blocks
    gub = torch.randint(0, 256, (EL, 2 * In, H // 2), dtype=torch.uint8, device=dev)
    gus = torch.randint(118, 128, (EL, 2 * In, H // 32), dtype=torch.uint8, device=dev)
    dnb = torch.randint(0, 256, (EL, H, In // 2), dtype=torch.uint8, device=dev)
    dns = torch.randint(118, 128, (EL, H, In // 32), dtype=torch.uint8, device=dev)
    ebytes = sum(w[0].numel() for w in (gub, gus, dnb, dns))
    for t, active in EXPERT_CASES:
        r = min(n_rot(active * ebytes), EL // active)
        lists = []
        for i in range(r):
            lst = torch.full((EL,), -1, dtype=torch.int32, device=dev)
            lst[:active] = torch.arange(i * active, (i + 1) * active, dtype=torch.int32, device=dev)
            lists.append(lst)
        cnt = torch.tensor([active], dtype=torch.int32, device=dev)
        x = torch.randn(moe.TP, H, device=dev).to(torch.bfloat16)
        tokw = torch.full((EL, moe.TP), 0.125, device=dev)
        y = torch.zeros(t, H, device=dev)
        floor = (active * ebytes + t * H * 2 + t * H * 4) / bw
        for loads in moe.LOADS:
            k_gu, k_dn, tiling = expert_tasks(t, loads)
            hb = torch.zeros(min(EL, t * mm["top_k"]), moe.TP, In, dtype=torch.bfloat16, device=dev)  # max slots

            def call(i, k_gu=k_gu, k_dn=k_dn, hb=hb, x=x, lists=lists, cnt=cnt, tokw=tokw, y=y):
                k_gu(x, gub, gus, lists[i], cnt, hb)
                k_dn(hb, dnb, dns, lists[i], cnt, tokw, y)

            t_ours, mode = graph_time([lambda i=i: call(i) for i in range(r)])
            res.append(dict(kernel="moe_gemv_tasks", shape=f"{loads} a={active}", t=t, loads=loads, active=active,
                            gu_cfg=repr(tiling.gu), down_cfg=repr(tiling.down), mode=mode, t_us=t_ours * 1e6,
                            floor_us=floor * 1e6, over_floor=t_ours / floor,
                            frac_of_copy_bw=active * ebytes / t_ours / bw))  # fmt: skip
            print(res[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precompile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="mxfp4,fp8,moe,experts")
    a = ap.parse_args()
    if a.precompile:
        return precompile()
    torch.manual_seed(0)
    bw, bws = copy_bw()
    torch.cuda.empty_cache()
    print(
        f"copy bandwidth {bw / 1e12:.3f} TB/s (read + write); "
        + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in bws.items()),
        flush=True,
    )
    res = []
    for part in a.only.split(","):
        try:
            {"mxfp4": bench_mxfp4, "fp8": bench_fp8, "moe": bench_moe, "experts": bench_experts}[part](bw, res)
        except Exception as e:
            traceback.print_exc()
            res.append(dict(kernel=part, error=str(e)[:500]))
    dev = torch.cuda.get_device_name()
    out = dict(
        device=dev,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        commit=os.environ.get("TILERT_COMMIT", "unknown"),
        torch=torch.__version__,
        copy_bw_tbps=bw / 1e12,
        copy_bw_methods_tbps={k: v / 1e12 for k, v in bws.items()},
        results=res,
    )
    path = Path(a.out) / f"kernels-{dev.replace(' ', '-').lower()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keep_other_run(path, out, "gemv"), indent=1))
    print("wrote", path)
    print(f"copy bw {bw / 1e12:.2f} TB/s")
    print(f"{'kernel':10} {'shape':14} {'M/T':>3} {'us':>7} {'bf16/loop':>9} {'floor':>6} {'xfloor':>6}", end="")
    print(f" {'frac_bw':>7} {'vs_bf16':>7}")
    for r in res:
        if "error" in r:
            print(r["kernel"], "ERROR", r["error"][:200])
            continue
        shape = str(r.get("shape", "mimo"))[:14]
        print(
            f"{r['kernel'][:10]:10} {shape:14} {r.get('m', r.get('t')):>3} {r['t_us']:7.2f} "
            f"{r.get('torch_bf16_us', r.get('torch_loop_us', 0)):9.2f} {r['floor_us']:6.2f} {r['over_floor']:6.2f} "
            f"{r.get('frac_of_copy_bw', 0):7.3f} {r.get('speedup_vs_bf16', r.get('speedup_vs_torch', 0)):7.2f}"
        )


if __name__ == "__main__":
    main()
