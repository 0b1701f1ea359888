"""Fill a kernel cache with the whole-step persistent kernels the GPU tests and benchmarks load, on a
machine without a GPU (meta tensors), so a GPU run spends its time running, not
compiling. Usage: TILERT_KERNEL_CACHE=DIR python scripts/precompile_gpu.py [--bench] [--diff-layers N]
[--probes] [--cli] [--kernels-sweep [--no-steps]] [--jobs 2] [--prune] [--pack OUT.tar.xz]

Builds tiny-gpu's step kernels at world 1 (decode B=1/4/6/16, verify B=4: the GPU tests' shapes) and
world 2 (both ranks: the two-ranks tests, on one GPU and on two), and tiny-gpu-8's verify step at
world 1, 8 (one GPU), 4 and 8 (a GPU per rank), and tiny-gpu's persistent drafter steps (its
compiled context shapes: the DFlash block and the prefill chunk); with --bench also rank 0 of the
8-rank mimo-v2.5-pro decode and verify steps and its drafter step (benchmarks/e2e.py); with
--diff-layers N the same steps of the model cut to its first N layers
(`benchmarks/e2e.py --layers N --diff-nodes`); with
--ranks-world N mimo's steps with N ranks on N GPUs (`e2e.py --ranks gpus`: the persistent
kernel and every rank's eager kernels); with --probes
the kernels of benchmarks/tile_latency.py and persistent_chain.py (--layers 1 8 --m 1); with --cli the
shapes of the CLI GPU test (tiny-gpu at max_seq 64/128/256, persistent and eager, the drafter at every
context length of a 1..40-token prompt) and the residency test's oversized grid; with --kernels-sweep
every kernel benchmarks/gemv_sweep.py launches (GEMV variants, their persistent task streams, the old
GEMMs) and the GEMV GPU tests' kernels (--no-steps: without the tiny step kernels); with --batching the
mixed-sequence step kernels and attention kernels of tests/runtime/test_mixed_step_gpu.py (and with
--bench the mixed steps of `benchmarks/batching.py users`); with --moe-gemv the
kernels of the GEMV expert body (TILERT_MOE_BODY=gemv): the GPU tests' tiny-gpu steps and standalone
expert tasks (tests/runtime/test_persistent_moe_gemv.py, tests/kernels/test_moe_gemv.py) and the
4-layer mimo-v2.5-pro B=1/B=8 steps of `benchmarks/step_variants.py --layers 4` (its base variant's
kernels come with --diff-layers 4, or `step_variants.py --precompile`); with --linear-gemv the kernels of
the streaming linear body (TILERT_LINEAR_BODY=gemv): the GPU tests' tiny-gpu steps, alone, with the
GEMV expert body and over 4 SM queues (tests/runtime/test_persistent_linear_gemv.py), the standalone kernels of
tests/kernels/test_gemv_linear.py, and the 4-layer mimo-v2.5-pro B=1/B=8 steps of the step_variants.py
variants `lgemv` (TILERT_LINEAR_BODY=gemv) and `both` (with TILERT_MOE_BODY=gemv). Jobs run in
`--jobs` processes (each compile is one nvcc process). TileLang's own nvcc cubin cache
(cuda-binaries) is not needed once a kernel is cached, so --prune drops it to keep the cache small;
--pack writes the cache as one .tar.xz (about 13x smaller: the kernel sources compress well).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tilert.engine.backend import PREFILL_CHUNK
from tilert.engine.eager import compile_for_gpu
from tilert.engine.persistent import compile_step, precompile, precompile_drafter
from tilert.kernels import switches
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph
from tilert.runtime.eager.precompile import precompile as eager_precompile
from tilert.runtime.eager.synthetic import meta_params
from tilert.runtime.persistent.step import PersistentStep

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not of the installed package

from benchmarks.e2e_ranks import rank_graphs  # noqa: E402

TINY = [(1, "decode", 1, 1), (4, "decode", 1, 1), (6, "decode", 1, 1), (4, "verify", 1, 1), (16, "decode", 1, 1),
        (1, "decode", 2, 1), (6, "decode", 2, 1), (4, "verify", 2, 1),
        (1, "decode", 2, 2), (6, "decode", 2, 2), (4, "verify", 2, 2)]  # fmt: skip
TINY8 = [(4, "verify", 1, 1), (4, "verify", 8, 1), (4, "verify", 4, 4), (4, "verify", 8, 8)]  # the 8-way checks
BENCH = [(1, "decode", 8), (8, "verify", 8)]
# tiny-gpu mixed steps (rows, max_seq, pool slots incl. the scratch slot): tests/runtime/test_mixed_step_gpu.py,
# and the Engine GPU tests that batch by default (test_api_gpu.py, test_persistent_step_gpu.py: 8 + 1 slots)
BATCHING = [(11, 256, 6), (16, 256, 6), (4, 256, 5), (8, 256, 5), (16, 256, 5), (1, 256, 2), (16, 256, 2),
            (1, 256, 9), (4, 256, 9), (5, 256, 9), (6, 256, 9), (10, 256, 9), (1, 128, 9), (3, 128, 9),
            (4, 128, 9)]  # fmt: skip
BATCHING_BENCH = (1, 2, 4, 8, 16)  # benchmarks/batching.py users: rank 0's mixed steps, 8 users + scratch
CLI_MAX_SEQ = (64, 128, 256)  # tests/cli/test_cli_gpu.py: tiny-gpu at these capacities
RESIDENCY_SMS = 9 * 132  # tests/runtime/test_persistent_residency_gpu.py: more CTAs than any SM set holds


def build_step(model: str, tokens: int, mode: str, max_seq: int, world: int, layers: int, gpus: int = 1,
               peers: bool | None = None, env: dict[str, str] | None = None) -> str:  # fmt: skip
    """One step kernel into the cache (runs in a worker process); env: build switches set meanwhile."""
    t0 = time.time()
    cfg = load_config(model)
    if layers:
        cfg = cfg.first_layers(layers)
    if peers is None:  # the tiny configs' multi-rank tests run every rank; mimo's e2e rank 0 alone
        peers = world > 1 and model.startswith("tiny")
    with switches.applied(env or {}):
        precompile(cfg, tokens, mode, max_seq, world, peers=peers, gpus=gpus)
    cut = f" ({layers} layers)" if layers else ""
    sw = f" [{','.join(f'{k}={v}' for k, v in (env or {}).items())}]" if env else ""
    return f"{model}{cut} {mode} B={tokens} world {world} on {gpus} GPU(s){sw}: {time.time() - t0:.0f} s"


# --moe-gemv: the GEMV expert body's kernels (TILERT_MOE_BODY=gemv)
MOE_GEMV = {"TILERT_MOE_BODY": "gemv"}
MOE_GEMV_TINY_TILINGS = ("", "1.1.2/1.1.2")  # tests/runtime/test_persistent_moe_gemv.py's variants ...
MOE_GEMV_TINY_SWITCHES = ({"TILERT_MOE_LOADS": "bulk"},)  # ... and its switched ones (picked tiling)
MOE_GEMV_TASKS = [(t, "mimo") for t in (1, 3, 8, 12)] + [(t, "tiny") for t in (1, 4, 16)]  # test_moe_gemv.py


def moe_gemv_jobs(max_seq: int = 256) -> list[tuple[tuple, dict[str, str]]]:
    """(build_step args, env) of the GEMV expert body's step kernels: tiny-gpu's prompt (16 rows),
    verify and decode steps per tiling of the GPU test, and the 4-layer mimo steps step_variants.py
    times (B=1 decode, B=8 verify, context 4096)."""
    jobs = []
    envs = [{**MOE_GEMV, **({"TILERT_MOE_GEMV_TILING": t} if t else {})} for t in MOE_GEMV_TINY_TILINGS]
    for env in envs + [{**MOE_GEMV, **sw} for sw in MOE_GEMV_TINY_SWITCHES]:
        jobs += [(("tiny-gpu", t, m, max_seq, 1, 0), env) for t, m in ((16, "decode"), (4, "verify"), (1, "decode"))]
    jobs += [(("mimo-v2.5-pro", t, m, 4096 + 64, 8, 4), dict(MOE_GEMV)) for t, m, _ in BENCH]
    return jobs


# --linear-gemv: the streaming linear body's kernels (TILERT_LINEAR_BODY=gemv), alone and with the GEMV experts
LINEAR_GEMV_VARIANTS = {"lgemv": {"TILERT_LINEAR_BODY": "gemv"},
                        "both": {"TILERT_LINEAR_BODY": "gemv", "TILERT_MOE_BODY": "gemv"}}  # fmt: skip


def linear_gemv_jobs(max_seq: int = 256) -> list[tuple[tuple, dict[str, str]]]:
    """(build_step args, env) of the streaming linear body's step kernels, per variant: tiny-gpu's
    prompt (16 rows), verify and decode steps (the GPU test) and the 4-layer mimo steps step_variants.py
    times (B=1 decode, B=8 verify, context 4096)."""
    jobs = []
    for env in LINEAR_GEMV_VARIANTS.values():
        jobs += [(("tiny-gpu", t, m, max_seq, 1, 0), dict(env)) for t, m in ((16, "decode"), (4, "verify"),
                                                                            (1, "decode"))]  # fmt: skip
        jobs += [(("mimo-v2.5-pro", t, m, 4096 + 64, 8, 4), dict(env)) for t, m, _ in BENCH]
    return jobs


# tests/runtime/test_persistent_linear_gemv.py: tiny-gpu scheduled over this many SM queues, so that
# some queues run several tasks of one linear back to back (the chained streaming linears)
LINEAR_CHAIN_SMS = 4


def build_linear_chain_step(tokens: int, mode: str) -> str:
    """tiny-gpu's step with the streaming linears over LINEAR_CHAIN_SMS SM queues ("chained": queues
    that run one linear's tasks back to back)."""
    t0 = time.time()
    with switches.applied({"TILERT_LINEAR_BODY": "gemv"}):
        g = build_step_graph(load_config("tiny-gpu"), tokens=tokens, mode=mode, max_seq=256)
        rg, sched = compile_step(g, 256, 1, sms=LINEAR_CHAIN_SMS)
        PersistentStep(rg, sched.table, sched.counter_expected, meta_params(rg), device="meta",
                       num_sms=sched.table.shape[0])  # fmt: skip
    took = time.time() - t0
    return f"tiny-gpu {mode} B={tokens} over {LINEAR_CHAIN_SMS} SM queues [TILERT_LINEAR_BODY=gemv]: {took:.0f} s"


def linear_gemv_test_configs() -> tuple[list, list]:
    """(options, stream) configs of tests/kernels/test_gemv_linear.py's GPU tests: the options over
    token counts 1, 3, 5, 8, 16, odd N (tiles past N), split-K, both output dtypes, 64- and 32-row
    tiles, the norm's statistics from global memory and from the staged rows; the persistent form (each
    task issues the next's chunks and scales, stages its own x)."""
    from tilert.kernels import gemv

    C, eps = gemv.Config, 1e-6
    options = [
        C("fp8", 1, 200, 1024, wr=2, g=2, split=1, depth=3, out_dtype="bfloat16", norm_eps=eps, norm_stats="global"),
        C("fp8", 3, 200, 1024, wr=2, g=2, split=2, depth=2, out_dtype="bfloat16", norm_eps=eps, res_dtype="bfloat16"),
        C("fp8", 8, 136, 2048, wr=2, g=2, split=4, depth=2, res_dtype="float32"),
        C("fp8", 16, 72, 768, wr=2, g=2, split=1, depth=4, out_dtype="bfloat16", norm_eps=eps, res_dtype="bfloat16"),
        C("fp8", 16, 3072, 6144, wr=2, g=2, split=2, depth=5, out_dtype="bfloat16", norm_eps=eps),
        C("fp8", 5, 232, 2048, wr=1, g=2, split=1, depth=4, out_dtype="bfloat16", norm_eps=eps, res_dtype="bfloat16"),
        C("fp8", 5, 232, 2048, wr=1, g=2, split=1, depth=4, out_dtype="bfloat16", norm_eps=eps, res_dtype="bfloat16",
          norm_stats="global"),
    ]
    stream = [
        C("fp8", 8, 192, 6144, wr=2, g=2, split=6, depth=5, out_dtype="bfloat16", evict_first=True, norm_eps=eps),
        C("fp8", 3, 200, 2048, wr=2, g=2, split=1, depth=5, out_dtype="bfloat16", evict_first=True,
          res_dtype="bfloat16"),
        # the narrow tiles (32 rows over the whole K) of mimo's q_proj at a verify block
        C("fp8", 8, 3072, 6144, wr=1, g=2, split=1, depth=5, out_dtype="bfloat16", evict_first=True, norm_eps=eps),
        C("fp8", 8, 3072, 6144, wr=1, g=2, split=1, depth=5, out_dtype="bfloat16", evict_first=True, norm_eps=eps,
          norm_stats="global"),
    ]  # fmt: skip
    return options, stream


def build_linear_gemv_kernels() -> str:
    """The standalone kernels of tests/kernels/test_gemv_linear.py's GPU tests (the options, the
    x_own task stream)."""
    from tilert.kernels import gemv

    t0 = time.time()
    OPTIONS, STREAM = linear_gemv_test_configs()
    for cfg in OPTIONS:
        gemv.compiled(cfg)
    for cfg in STREAM:
        gemv.compiled_stream(cfg, 2 * 132 // cfg.tiles + 2, 132, True, True)
    return f"streaming linear kernels ({len(OPTIONS) + len(STREAM)}): {time.time() - t0:.0f} s"


def build_moe_gemv_tasks(tokens: int, shape: str) -> str:
    """The standalone GEMV expert tasks of tests/kernels/test_moe_gemv.py's GPU tests."""
    from tilert.kernels import moe

    t0 = time.time()
    H, In, EL, k = (6144, 2048, 48, 8) if shape == "mimo" else (256, 512, 16, 4)
    for bulk in (False, True):  # TILERT_MOE_LOADS=thread and bulk
        til = dataclasses.replace(moe.tiling(tokens, H, In, EL, k, body="gemv"),
                                  gemv=moe.gemv_tiling(tokens, H, In, bulk=bulk))  # fmt: skip
        moe.compiled_gemv_tasks(moe.Config(tokens, H, In, EL, EL, k), til)
    return f"MoE GEMV expert tasks ({shape}, T={tokens}, both loads): {time.time() - t0:.0f} s"


# --mxfp4-decode: the GPU tests of TILERT_MXFP4_ORDER=decode (tests/kernels: test_gemv, test_mxfp4_gemm,
# test_moe_gemv) and the tiny-gpu steps, decode order
DECODE_ORDER = {"TILERT_MXFP4_ORDER": "decode"}
DECODE_ORDER_GEMV_M = (1, 8, 16)  # test_gemv.py::test_gemv_mxfp4_decode_order, 4096 x 6144
DECODE_ORDER_GEMM = ((17, 1000, 32 * 5), (64, 4096, 2048))  # test_mxfp4_gemm.py::test_mxfp4_gemm_in_decode_order
DECODE_ORDER_MOE_T = (1, 8, 12)  # test_moe_gemv.py::DECODE_ORDER_CASES


def build_decode_order_kernels() -> str:
    """The decode-order GPU tests' GEMV, GEMM and expert-task kernels."""
    from tilert.kernels import gemv, moe, mxfp4_gemm

    t0 = time.time()
    with switches.applied(DECODE_ORDER):
        for m in DECODE_ORDER_GEMV_M:
            gemv.compiled(gemv.pick_config("mxfp4", m, 4096, 6144))
        for m, n, k in DECODE_ORDER_GEMM:
            mxfp4_gemm.compiled(mxfp4_gemm.eager_config(m, n, k))
        for t in DECODE_ORDER_MOE_T:
            H, In, EL, k = 6144, 2048, 48, 8
            moe.compiled_gemv_tasks(moe.Config(t, H, In, EL, EL, k), moe.tiling(t, H, In, EL, k, body="gemv"))
    return f"MXFP4 decode order: the GEMV, GEMM and expert-task kernels of its GPU tests: {time.time() - t0:.0f} s"


def build_drafter(model: str, context: int, max_seq: int, world: int) -> str:
    """One persistent drafter step kernel (rank 0 of `world`) into the cache."""
    t0 = time.time()
    precompile_drafter(load_config(model), context, max_seq, world)
    return f"{model} drafter context {context} world {world}: {time.time() - t0:.0f} s"


def drafter_contexts(model: str) -> tuple[int, ...]:
    """The context shapes PersistentBackend compiles drafter steps for (its drafter_contexts)."""
    return tuple(sorted({PREFILL_CHUNK, load_config(model).dflash.block_size}))


def build_mixed_step(model: str, tokens: int, max_seq: int, world: int, slots: int) -> str:
    """One mixed-sequence step kernel (a pool of `slots` cache slots) into the cache."""
    t0 = time.time()
    precompile(load_config(model), tokens, "decode", max_seq, world, slots=slots)
    return f"{model} mixed B={tokens} slots {slots} world {world}: {time.time() - t0:.0f} s"


def build_mixed_attention() -> str:
    """The eager attention kernels of the mixed-step GPU tests, and tiny-gpu's mixed-step eager kernels."""
    t0 = time.time()
    from tilert.kernels import attention as A

    seqs_rows = (11, 16, 1, 8)
    cfgs = [A.AttnConfig(block=b, window=w, sink=bool(w), rope_theta=1e4 if w else 1e7, mixed=True)
            for b in seqs_rows for w in (0, 128)]  # fmt: skip
    cfgs.append(A.AttnConfig(block=11, rows_per_cta=128, min_tiles=A.PERSISTENT_MIN_TILES, mixed=True))
    for c in cfgs:
        A.compiled(c)
    cfg = load_config("tiny-gpu")
    graphs = [build_step_graph(cfg, tokens=t, mode="decode", max_seq=q, slots=s) for t, q, s in BATCHING]
    n = eager_precompile([compile_for_gpu(g, g.meta["max_seq"])[0] for g in graphs])
    return f"mixed attention kernels ({len(cfgs)}) and tiny-gpu mixed eager kernels ({n}): {time.time() - t0:.0f} s"


def build_residency() -> str:
    """tiny-gpu's decode step scheduled over RESIDENCY_SMS queues: a grid no GPU holds at once."""
    t0 = time.time()
    rg, sched = compile_step(build_step_graph(load_config("tiny-gpu"), tokens=1, mode="decode", max_seq=256), 256,
                             sms=RESIDENCY_SMS)  # fmt: skip
    PersistentStep(rg, sched.table, sched.counter_expected, meta_params(rg), device="meta", num_sms=RESIDENCY_SMS)
    return f"tiny-gpu decode B=1 over {RESIDENCY_SMS} SM queues: {time.time() - t0:.0f} s"


def build_cli_eager(max_seq: int) -> str:
    """The eager kernels of tiny-gpu's step shapes (prefill chunk, decode, verify) and of its drafter
    at every context length a 1..40-token prompt gives (the CLI GPU test)."""
    t0 = time.time()
    cfg = load_config("tiny-gpu")
    block = cfg.dflash.block_size
    graphs = [build_step_graph(cfg, tokens=t, mode=m, max_seq=max_seq)
              for t, m in ((1, "decode"), (PREFILL_CHUNK, "decode"), (block, "verify"))]  # fmt: skip
    graphs += [build_drafter_graph(cfg, context=c, max_seq=max_seq) for c in range(1, 41)]
    n = eager_precompile([compile_for_gpu(g, max_seq)[0] for g in graphs])
    return f"tiny-gpu eager kernels at max_seq {max_seq} ({n} configurations): {time.time() - t0:.0f} s"


def build_eager_ranks(model: str, tokens: int, mode: str, max_seq: int, world: int, layers: int) -> str:
    """The eager kernels of every rank's graph (compile_ranks(..., gpus=world)): the NCCL phase of
    `e2e.py --ranks gpus` runs these graphs on the eager runtime."""
    t0 = time.time()
    _, graphs, _ = rank_graphs(model, layers, tokens, max_seq, world)
    n = eager_precompile(graphs)
    cut = f" ({layers} layers)" if layers else ""
    took = time.time() - t0
    return f"{model}{cut} {mode} B={tokens}, eager kernels of {world} ranks ({n} configurations): {took:.0f} s"


def build_probes() -> str:
    """The probe benchmarks' kernels (they have their own --precompile)."""
    t0 = time.time()
    for cmd in (["benchmarks/tile_latency.py", "--precompile"],
                ["benchmarks/persistent_chain.py", "--precompile", "--layers", "1", "8", "--m", "1"]):  # fmt: skip
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, capture_output=True)
    return f"probes (tile_latency, persistent_chain): {time.time() - t0:.0f} s"


def build_sweep_kernel(item: tuple) -> str:
    """One kernel of benchmarks/gemv_sweep.kernel_list (runs in a worker process)."""
    from benchmarks.gemv_sweep import build_item

    return build_item(item)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true", help="also the mimo-v2.5-pro rank-0 steps of benchmarks/e2e.py")
    ap.add_argument("--diff-layers", type=int, default=0, help="also those steps of the model cut to N layers")
    ap.add_argument("--probes", action="store_true", help="also the tile_latency and persistent_chain kernels")
    ap.add_argument("--ranks-world", type=int, default=0,
                    help="also mimo's steps with every rank on its own GPU at this world size (e2e.py --ranks "
                         "gpus; with --diff-layers: the cut model only)")  # fmt: skip
    ap.add_argument("--cli", action="store_true",
                    help="also the shapes of tests/cli/test_cli_gpu.py (tiny-gpu at max_seq 64/128/256, eager and "
                         "persistent) and the residency test's oversized grid")  # fmt: skip
    ap.add_argument("--only-cli", action="store_true", help="only what --cli adds")
    ap.add_argument("--max-gpus", type=int, default=8,
                    help="skip the tests' steps that need more GPUs than this (a one-GPU machine: 1)")  # fmt: skip
    ap.add_argument("--kernels-sweep", action="store_true",
                    help="also every kernel of benchmarks/gemv_sweep.py and the GEMV GPU tests")  # fmt: skip
    ap.add_argument("--no-steps", action="store_true", help="skip the tiny step kernels (e.g. with --kernels-sweep)")
    ap.add_argument("--batching", action="store_true",
                    help="also the mixed-sequence steps of the batching GPU tests (with --bench: of "
                         "benchmarks/batching.py users)")  # fmt: skip
    ap.add_argument("--moe-gemv", action="store_true",
                    help="also the GEMV expert body's kernels (TILERT_MOE_BODY=gemv): its GPU tests' steps and "
                         "tasks, and the 4-layer mimo steps of step_variants.py")  # fmt: skip
    ap.add_argument("--linear-gemv", action="store_true",
                    help="also the streaming linear body's kernels (TILERT_LINEAR_BODY=gemv): its GPU tests' steps "
                         "and kernels, and the 4-layer mimo steps of step_variants.py's lgemv and both")  # fmt: skip
    ap.add_argument("--mxfp4-decode", action="store_true",
                    help="also the kernels of the TILERT_MXFP4_ORDER=decode GPU tests (GEMV, GEMM, expert tasks) "
                         "and the tiny-gpu steps in that order")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--prune", action="store_true", help="drop TileLang's cubin cache afterwards")
    ap.add_argument("--pack", default=None, help="also write the cache as this .tar.xz (for a GPU machine)")
    a = ap.parse_args()
    steps = not (a.only_cli or a.no_steps)
    jobs = [("tiny-gpu", t, m, 256, w, 0, gpus) for t, m, w, gpus in TINY if steps and gpus <= a.max_gpus]
    jobs += [("tiny-gpu-8", t, m, 256, w, 0, gpus) for t, m, w, gpus in TINY8 if steps and gpus <= a.max_gpus]
    # rank 0 of 2 with solo collectives: the speculative loop's GPU test (tests/profile/test_speculative_loop.py)
    jobs += [("tiny-gpu", t, m, 256, 2, 0, 1, False) for t, m in ((1, "decode"), (4, "verify")) if steps]
    # the persistent drafter steps of the GPU tests (PersistentBackend's context shapes), and with --cli
    # those of the CLI test's capacities
    drafters = [("tiny-gpu", c, 256, 1) for c in drafter_contexts("tiny-gpu") if steps]
    # and rank 0 of 2's (the loop GPU test drafts with the model's drafter on its solo rank)
    drafters += [("tiny-gpu", c, 256, 2) for c in drafter_contexts("tiny-gpu") if steps]
    cli = a.cli or a.only_cli
    if cli:
        drafters += [("tiny-gpu", c, q, 1) for q in CLI_MAX_SEQ if q != 256 for c in drafter_contexts("tiny-gpu")]
    if a.bench:  # benchmarks/e2e.py's drafter step: B context rows, rank 0 of 8
        drafters.append(("mimo-v2.5-pro", load_config("mimo-v2.5-pro").dflash.block_size, 4096 + 64, 8))
    if cli:
        jobs += [("tiny-gpu", t, m, q, 1, 0) for q in CLI_MAX_SEQ for t, m in ((1, "decode"), (16, "decode"),
                                                                              (4, "verify"))]  # fmt: skip
    if a.bench:
        jobs += [("mimo-v2.5-pro", t, m, 4096 + 64, w, 0) for t, m, w in BENCH]
    if a.diff_layers:
        jobs += [("mimo-v2.5-pro", t, m, 4096 + 64, w, a.diff_layers) for t, m, w in BENCH]
    if a.ranks_world:  # one kernel serves every rank (the rank's numbers are data)
        n = a.ranks_world
        jobs += [("mimo-v2.5-pro", t, m, 4096 + 64, n, a.diff_layers, n, True) for t, m, _ in BENCH]
        eager_jobs = [("mimo-v2.5-pro", t, m, 4096 + 64, n, a.diff_layers) for t, m, _ in BENCH]
    else:
        eager_jobs = []
    with ProcessPoolExecutor(max_workers=max(1, a.jobs), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(build_step, *j) for j in jobs] + [pool.submit(build_eager_ranks, *j) for j in eager_jobs]
        futures += [pool.submit(build_drafter, *j) for j in drafters]
        if a.moe_gemv:
            futures += [pool.submit(build_step, *j, env=env) for j, env in moe_gemv_jobs()]
            futures += [pool.submit(build_moe_gemv_tasks, *j) for j in MOE_GEMV_TASKS]
        if a.mxfp4_decode:
            futures.append(pool.submit(build_decode_order_kernels))
            futures += [pool.submit(build_step, "tiny-gpu", t, m, 256, 1, 0, env=dict(DECODE_ORDER))
                        for t, m in ((16, "decode"), (4, "verify"), (1, "decode"))]  # fmt: skip
        if a.linear_gemv:
            futures += [pool.submit(build_step, *j, env=env) for j, env in linear_gemv_jobs()]
            futures.append(pool.submit(build_linear_gemv_kernels))
            futures += [pool.submit(build_linear_chain_step, t, m) for t, m in ((16, "decode"), (4, "verify"),
                                                                                  (1, "decode"))]  # fmt: skip
        if cli:
            futures += [pool.submit(build_residency)] + [pool.submit(build_cli_eager, q) for q in CLI_MAX_SEQ]
        if a.probes:
            futures.append(pool.submit(build_probes))
        if a.batching:
            futures += [pool.submit(build_mixed_step, "tiny-gpu", t, q, 1, s) for t, q, s in BATCHING]
            futures.append(pool.submit(build_mixed_attention))
            if a.bench:
                futures += [pool.submit(build_mixed_step, "mimo-v2.5-pro", t, 4096 + 64, 8, 9) for t in BATCHING_BENCH]
        if a.kernels_sweep:
            from benchmarks.gemv_sweep import kernel_list

            futures += [pool.submit(build_sweep_kernel, it) for it in kernel_list()]
        for f in futures:
            print(f.result(), flush=True)
    cache = Path(os.environ.get("TILERT_KERNEL_CACHE", "~/.cache/tilert/kernels")).expanduser()
    if a.prune:
        for d in prunable(cache):
            shutil.rmtree(d)
    print(f"cache: {cache}")
    if a.pack:
        print(f"packed: {pack(cache, Path(a.pack))}")


def prunable(cache: Path) -> list[Path]:
    """TileLang's nvcc cubin caches under the kernel cache (cuda-binaries; .staging since TileLang
    0.1.15, under <version>/<platform>/), which a loaded kernel no longer needs."""
    found = sorted({d for name in ("cuda-binaries", ".staging") for d in cache.rglob(name) if d.is_dir()})
    return [d for d in found if not any(p in found for p in d.parents)]  # the outermost of nested ones


def pack(cache: Path, out: Path) -> Path:
    """The cache as one .tar.xz (the kernel sources compress about 13x), so it travels to a GPU
    machine within a small upload budget. It holds the cache as kernels/: unpack with `tar -C DIR
    -xJf OUT` and point TILERT_KERNEL_CACHE at DIR (or DIR/kernels: the same cache)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tf:
        tf.add(cache, arcname="kernels")
    return out


if __name__ == "__main__":
    main()
