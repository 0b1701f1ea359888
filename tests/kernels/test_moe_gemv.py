"""The persistent MoE's GEMV expert body (TILERT_MOE_BODY=gemv, tilert/kernels/moe.py make_gemv_tasks):
its switch, tilings and item split on the CPU, the standalone expert tasks compiled for sm_90a
(skipped without nvcc), and against the float64 reference at the mimo shapes on a Hopper GPU."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tilert.kernels import common, gemv, moe
from tilert.models.config import load_config
from tilert.numerics import mxfp4

needs_toolchain = pytest.mark.skipif(not common.has_toolchain(), reason=str(common.toolchain_reason()))

M = moe.MIMO
MIMO_SHAPE = (M["hidden"], M["inter"], M["n_local"], M["top_k"])  # H, I, local experts, top-k
TINY_SHAPE = (256, 512, 16, 4)  # tiny-gpu: fewer k chunks than warps (more warps along rows), byte-loaded scales
TOL_H = 4e-3  # Hb is bf16: 2^-9 relative per element on top of exact dequantisation and fp32 MMAs
TOL_Y = 1e-3


def test_body_switch(monkeypatch):
    monkeypatch.delenv(moe.BODY_ENV, raising=False)
    assert moe.body_choice() == "gemv" and moe.tiling(8, *MIMO_SHAPE).gemv is not None
    monkeypatch.setenv(moe.BODY_ENV, "mainloop")
    assert moe.body_choice() == "mainloop" and moe.tiling(8, *MIMO_SHAPE).gemv is None
    monkeypatch.setenv(moe.BODY_ENV, "fast")
    with pytest.raises(ValueError, match="TILERT_MOE_BODY='fast'"):
        moe.body_choice()


@pytest.mark.parametrize("tokens", range(1, 17))
@pytest.mark.parametrize("shape", [MIMO_SHAPE, TINY_SHAPE], ids=["mimo", "tiny-gpu"])
def test_gemv_tiling_fits(shape, tokens):
    H, In, EL, k = shape
    gt = moe.gemv_tiling(tokens, H, In)
    if gt is None:  # mimo at 15+ tokens: x alone is 180+ KB; the node keeps the mainloop body
        assert shape == MIMO_SHAPE and tokens > 14
        assert moe.tiling(tokens, H, In, EL, k, body="gemv").gemv is None
        return
    for cfg, nx, (n, kk) in ((gt.gu, 1, (2 * In, H)), (gt.down, 2, (H, In))):
        assert (cfg.fmt, cfg.m, cfg.n, cfg.k, cfg.split) == ("mxfp4", tokens, n, kk, 1)
        assert gemv.item_smem_bytes(cfg, nx) <= moe.GEMV_SMEM
        assert 2 <= cfg.depth <= cfg.items + 1 and cfg.ncs >= cfg.wk and cfg.rows <= n
    assert gt.gu_width == gt.gu.rows // 2 and gt.down_rows == gt.down.rows
    if shape == MIMO_SHAPE and tokens <= 8:  # the step's winners: 48 KB / 64 KB in flight per SM
        assert (gt.gu.wr, gt.gu.g, gt.gu.depth) == (1, 2, 4) and (gt.down.wr, gt.down.g, gt.down.depth) == (2, 2, 5)


def test_forced_tiling(monkeypatch):
    monkeypatch.setenv(moe.TILING_ENV, "1.1.6/1.2.3")
    gt = moe.gemv_tiling(8, M["hidden"], M["inter"])
    assert (gt.gu.g, gt.gu.depth, gt.down.g, gt.down.depth) == (1, 6, 2, 3)
    monkeypatch.setenv(moe.TILING_ENV, "1.2.4")
    with pytest.raises(ValueError, match="wr.g.depth/wr.g.depth"):
        moe.gemv_tiling(8, M["hidden"], M["inter"])
    monkeypatch.setenv(moe.TILING_ENV, "1.1.8/1.4.3")  # 7 chunks ahead: more than a warp's 6
    with pytest.raises(ValueError, match="gate/up tiling needs depth - 1 <= 6"):
        moe.gemv_tiling(8, M["hidden"], M["inter"])
    monkeypatch.setenv(moe.TILING_ENV, "1.2.16/1.4.3")  # a ring past the SM's shared memory
    with pytest.raises(ValueError, match="TILERT_MOE_GEMV_TILING='1.2.16/1.4.3': GEMV config: bad shared memory"):
        moe.gemv_tiling(8, M["hidden"], M["inter"])


@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
@pytest.mark.parametrize("shape", [MIMO_SHAPE, TINY_SHAPE, (512, 384, 5, 2)], ids=["mimo", "tiny-gpu", "odd"])
def test_gemv_items_cover_the_active_slots_once(shape, tokens):
    H, In, EL, k = shape
    base = moe.tiling(tokens, H, In, EL, k, body="mainloop")
    geo = moe.tiling(tokens, H, In, EL, k, body="gemv")
    if geo.gemv is None:
        return
    # the table does not depend on the body: the same task counts
    assert (geo.gu_tasks, geo.down_tasks, geo.max_slots) == (base.gu_tasks, base.down_tasks, base.max_slots)
    assert geo.gu_tiles == -(-In // geo.gu_width) and geo.down_tiles == -(-H // geo.down_rows)
    for count in range(geo.max_slots + 1):
        for tasks, items, steps, every in (
            (geo.gu_tasks, geo.gu_items, geo.gu_steps, [(s, t) for s in range(count) for t in range(geo.gu_tiles)]),
            (geo.down_tasks, geo.down_items, geo.down_steps,
             [(s, t, 0) for s in range(count) for t in range(geo.down_tiles)]),
        ):  # fmt: skip
            per_task = [items(j, count) for j in range(tasks)]
            assert [it for its in per_task for it in its] == every  # contiguous shares, in order
            assert max(len(its) for its in per_task) <= steps
            assert max(len(its) for its in per_task) - min(len(its) for its in per_task) <= 1  # balanced
    assert [i for t in range(geo.gu_tiles) for i in range(*geo.gu_cols(t))] == list(range(In))
    assert [i for t in range(geo.down_tiles) for i in range(*geo.down_cols(t))] == list(range(H))


@pytest.mark.parametrize("tokens", [1, 8])
def test_task_costs_follow_the_body(monkeypatch, tokens):
    # passes/tile.py's per-task work from either body's items: the same streamed bytes, Hb / Y
    # writes and flops (the items differ in size and number, the tasks' shares do not); the GEMV
    # body's down tasks restage Hb for fewer slots (contiguous items)
    from tilert.models.builder import build_step_graph
    from tilert.passes.manager import PassContext, passes_until, run_passes
    from tilert.passes.tile import tile_moe

    cfg = load_config("mimo-v2.5-pro")
    g = build_step_graph(cfg.first_layers(2), tokens=tokens, mode="verify" if tokens > 1 else "decode", max_seq=4160)
    rg = run_passes(g, PassContext(world=8), passes_until("fuse_residual"))[0]
    node = next(n for n in rg.nodes if n.op.startswith("fused_moe"))
    costs = {}
    for body in moe.BODIES:
        monkeypatch.setenv(moe.BODY_ENV, body)
        stages = {s.opcode: s for s in tile_moe(rg, node, PassContext(world=8)).stages}
        costs[body] = {op: (stages[op].stream[0], stages[op].flops[0], stages[op].nbytes[0]) for op in stages}
    for op in ("MOE_GATE_UP", "MOE_DOWN"):
        (sa, fa, ba), (sb, fb, bb) = costs["mainloop"][op], costs["gemv"][op]
        assert sb == pytest.approx(sa) and fb == pytest.approx(fa), op
        assert bb <= ba * (1 + 1e-9), op


def _torch_tasks(t: int, inter: int, wrong_expert: bool = False, stray_slot: bool = False):
    """The expert tasks' contract in torch (check_gemv_tasks' kernels argument), optionally broken."""
    import torch

    from tilert.ops.linear import dequant_mxfp4

    def gate_up(x, gub, gus, lst, cnt, hb):
        for s in range(int(cnt[0])):
            e = int(lst[s]) + (1 if wrong_expert and s == 0 else 0)
            w = dequant_mxfp4(gub[e], gus[e])
            g, u = x[:t].float() @ w[:inter].t(), x[:t].float() @ w[inter:].t()
            hb[s, :t] = (torch.nn.functional.silu(g) * u).to(hb.dtype)
        if stray_slot:
            hb[int(cnt[0]) :, :t] = 0

    def down(hb, dnb, dns, lst, cnt, tokw, y):
        for s in range(int(cnt[0])):
            e = int(lst[s])
            y += (hb[s, :t].float() @ dequant_mxfp4(dnb[e], dns[e]).t()) * tokw[e, :t, None]

    return gate_up, down


def test_expert_task_check_passes_the_contract_and_catches_breaks():
    # check_gemv_tasks itself on the CPU, with the tasks' contract written in torch: ~0 for it, a
    # wrong expert is an O(1) error, a write past the active slots raises
    args = (3, 256, 512, 16, 4)
    eh, ey = moe.check_gemv_tasks(*args, active=5, seed=1, device="cpu", kernels=_torch_tasks(3, 512))
    assert eh < TOL_H and ey < TOL_Y, (eh, ey)
    eh, _ = moe.check_gemv_tasks(*args, active=5, seed=1, device="cpu", kernels=_torch_tasks(3, 512, True))
    assert eh > 0.1
    with pytest.raises(AssertionError, match="past the active slots"):
        moe.check_gemv_tasks(*args, active=5, seed=1, device="cpu", kernels=_torch_tasks(3, 512, stray_slot=True))


def test_expert_task_check_has_a_reference_at_one_token_and_one_expert():
    # one token, one active expert: a zero routing weight would make Y's reference zero and its
    # relative error 0 / 0 (NaN: the GPU test failed on such a seed); every seed must give a finite
    # error for the contract and an O(1) one for a down task that drops the expert's weight
    args = (1, 256, 512, 16, 4)

    def no_weight(hb, dnb, dns, lst, cnt, tokw, y):
        y += hb[0, :1].float() @ moe_ref_down(dnb, dns, lst).t()

    def moe_ref_down(dnb, dns, lst):
        from tilert.ops.linear import dequant_mxfp4

        return dequant_mxfp4(dnb[int(lst[0])], dns[int(lst[0])])

    for seed in range(12):
        eh, ey = moe.check_gemv_tasks(*args, active=1, seed=seed, device="cpu", kernels=_torch_tasks(1, 512))
        assert eh < TOL_H and ey < TOL_Y, (seed, eh, ey)
        gate_up, _ = _torch_tasks(1, 512)
        _, ey = moe.check_gemv_tasks(*args, active=1, seed=seed, device="cpu", kernels=(gate_up, no_weight))
        assert ey > 1e-3, seed


def test_item_smem_counts_the_x_buffers():
    cfg = moe.gemv_tiling(8, M["hidden"], M["inter"]).gu
    x = cfg.m * cfg.k * 2  # one x slice: all of K, every token
    assert gemv.item_smem_bytes(cfg, 2) == gemv.smem_bytes(cfg, prefetch=True)
    assert gemv.item_smem_bytes(cfg, 1) == gemv.smem_bytes(cfg, prefetch=True) - x


def test_item_body_takes_only_mxfp4_without_split():
    cfg = gemv.Config("fp8", 8, 256, 1024)
    with pytest.raises(ValueError, match="item body"):
        gemv.make_body(cfg, items=gemv.ItemMap(256, 8, None, None, None))


def test_bulk_loads_are_a_form_of_the_mxfp4_item_body_only():
    with pytest.raises(ValueError, match="bulk with fmt fp8"):
        gemv.Config("fp8", 8, 256, 1024, bulk=True)
    with pytest.raises(ValueError, match="bulk with fmt mxfp4, split 2"):
        gemv.Config("mxfp4", 8, 256, 1024, split=2, bulk=True)
    with pytest.raises(ValueError, match="form of the item body"):
        gemv.make_body(gemv.Config("mxfp4", 8, 256, 1024, bulk=True))


def test_bulk_ring_counts_its_padded_rows_and_barriers(monkeypatch):
    # row-major stages: rows x (k warps x 64 B + BULK_PAD) per slot, a 64-bit barrier per slot; a
    # tiling still fits wherever the thread loads' does (every mimo and tiny token count but mimo's 16)
    cfg = moe.gemv_tiling(8, M["hidden"], M["inter"], bulk=True).down
    plain = dataclasses.replace(cfg, bulk=False)
    extra = cfg.depth * (cfg.rows * gemv.BULK_PAD + 8)
    assert gemv.item_smem_bytes(cfg, 2) - gemv.item_smem_bytes(plain, 2) == extra
    for t in (1, 2, 3, 4, 8, 12, 16):
        for shape in (MIMO_SHAPE, TINY_SHAPE):
            til = moe.gemv_tiling(t, shape[0], shape[1], bulk=True)
            if moe.gemv_tiling(t, shape[0], shape[1], bulk=False) is None:
                assert til is None
                continue
            assert til is not None and til.gu.bulk and til.down.bulk, (t, shape)
            assert gemv.item_smem_bytes(til.gu, 1) <= moe.GEMV_SMEM
            assert gemv.item_smem_bytes(til.down, 2) <= moe.GEMV_SMEM
    monkeypatch.setenv(moe.LOADS_ENV, "bulk")
    assert moe.tiling(8, *MIMO_SHAPE, body="gemv").gemv.gu.bulk
    monkeypatch.setenv(moe.LOADS_ENV, "tma")
    with pytest.raises(ValueError, match="TILERT_MOE_LOADS='tma'"):
        moe.tiling(8, *MIMO_SHAPE, body="gemv")


@pytest.mark.parametrize(("m", "n", "k", "wr", "g", "depth"), [
    (8, 4096, 6144, 1, 2, 4),  # mimo gate/up
    (8, 6144, 2048, 1, 4, 3),  # mimo down
    (8, 6144, 2048, 2, 2, 5),  # down with two row warps
    (4, 1024, 256, 4, 2, 2),  # tiny: fewer k chunks than warps
    (1, 64, 160, 4, 1, 2),  # a row of 80 bytes: the stage cut at the row's end
])  # fmt: skip
def test_bulk_stages_put_every_lane_on_the_bytes_its_thread_load_would_read(m, n, k, wr, g, depth):
    # the producer's copies (BulkStages.dst/src/copy_bytes) into a ring of stale bytes, then each
    # lane's 16-byte reads (BulkStages.read) for each chunk: the bytes of weight row lrow, unit
    # ci * 4 + c that the per-thread cp.async path loads for that lane and piece (past the row's end
    # it reads zeros there and stale bytes here: finite E2M1 codes times x's zeros); and each group
    # of 8 lanes (one shared-memory wavefront of 16-byte reads) hits 8 distinct 16-byte bank groups
    import numpy as np

    cfg = gemv.Config("mxfp4", m, n, k, wr=wr, g=g, depth=depth, bulk=True)
    bs = gemv.BulkStages(cfg.rows, cfg.wk, cfg.row_bytes)
    R, WK, D, P = cfg.rows, cfg.wk, cfg.depth, 2 * cfg.g
    rng = np.random.default_rng(k)
    w = rng.integers(0, 256, (R, cfg.row_bytes), dtype=np.uint8)
    ring = np.full(D * bs.slot_bytes, 0xEE, dtype=np.uint8)
    assert bs.pitch % 16 == 0 and bs.slot_bytes % 16 == 0
    for i in range(cfg.items):
        slot, nb = i % D, bs.copy_bytes(i)
        assert 0 < nb <= bs.sb and nb % 16 == 0
        for lr in range(R):
            dst, src = bs.dst(slot, lr), bs.src(lr, i)
            assert dst % 16 == 0 and src % 16 == 0 and dst + nb <= (slot + 1) * bs.slot_bytes
            ring[dst : dst + nb] = w.reshape(-1)[src : src + nb]
        for warp in range(gemv.WARPS):
            ci = warp % WK + WK * i
            if ci >= cfg.ncs:
                continue
            for p in range(P):
                banks = []
                for lane in range(32):
                    r, c = lane // 4, lane % 4
                    lrow = (warp // WK) * 16 * cfg.g + (p // 2) * 16 + (p % 2) * 8 + r
                    at = bs.read(slot, lrow, warp, c)
                    banks.append((at // 16) % 8)
                    unit = ci * 4 + c
                    if unit * 16 < cfg.row_bytes:
                        assert (ring[at : at + 16] == w[lrow, unit * 16 : unit * 16 + 16]).all(), (i, warp, lane, p)
                assert all(len(set(banks[q : q + 8])) == 8 for q in range(0, 32, 8)), (warp, p, banks)


# --- sm_90a compile (no GPU) ------------------------------------------------------------------


def _dynamic_smem(host: str) -> int | None:
    vals = [int(v) for v in re.findall(r"v_int64\) = \(\(int64_t\)(\d+)\)", host)]
    at = [j + 3 for j in range(len(vals) - 3) if vals[j : j + 3] == [256, 1, 1]]
    return vals[at[0]] if at else None


@needs_toolchain
@pytest.mark.timeout(900)
def test_expert_tasks_compile_for_sm90a():
    # mimo verify (8 tokens): the step's gate/up and down tasks as standalone launches
    from tilert.kernels import sass

    H, In, EL, k = MIMO_SHAPE
    til = moe.tiling(8, H, In, EL, k, body="gemv")
    cfg = moe.Config(8, H, In, EL, EL, k)
    for kern, nx, c in zip(moe.compiled_gemv_tasks(cfg, til), (1, 2), (til.gemv.gu, til.gemv.down)):
        src = kern.get_kernel_source()
        # the streaming loads (cp.async into the private rings) and the register dequant, not the
        # mainloop's register loads (the prelude's definition is the one occurrence)
        assert "tilert_cp_async16(" in src and "tilert_e2m1x2_lh" in src and "tilert_cp_async_wait" in src
        assert "mma_sync" in src and src.count("tilert_ld16_ef(") == 1
        dyn = _dynamic_smem(kern.get_host_source())
        assert dyn is None or dyn <= gemv.item_smem_bytes(c, nx), (dyn, gemv.item_smem_bytes(c, nx))
        # per item: after the first chunks' wait, before and after the reduction, the end: no
        # barrier in the chunk loop (the rings are private to a thread)
        assert src.count("__syncthreads()") == 4, src.count("__syncthreads()")
        lib = sass.library_of(src, common.cache_dir())
        if lib is not None and sass.find_nvdisasm():
            code = sass.disassemble(lib)
            assert "LDGSTS" in code and "HMMA" in code and not sass.odd_descriptors(code)
            assert "LDL" not in code and "STL" not in code, "registers spilled to local memory"


def _integer_ops(code: str) -> int:
    """LOP3, PRMT, SHF and IMAD instructions in a disassembly (the decode's work)."""
    return len(re.findall(r"\b(?:LOP3|PRMT|SHF|IMAD)[.\s]", code))


@needs_toolchain
@pytest.mark.timeout(900)
def test_decode_order_expert_tasks_compile_for_sm90a(monkeypatch):
    # TILERT_MXFP4_ORDER=decode: the mimo verify tasks decode with tilert_e2m1x2_ord (no nibble
    # split, no byte permute), spill nothing, and run fewer integer instructions than the published
    # order's tasks: per decoded bf16x2 register (4 an MMA) a funnel shift or multiply and a mask
    # in place of a permute, a multiply and a mask (and the word's nibble split)
    from tilert.kernels import sass

    H, In, EL, k = MIMO_SHAPE
    til = moe.tiling(8, H, In, EL, k, body="gemv")
    cfg = moe.Config(8, H, In, EL, EL, k)
    codes = {}
    for order in ("published", "decode"):
        monkeypatch.setenv(mxfp4.ORDER_ENV, order)
        for i, kern in enumerate(moe.compiled_gemv_tasks(cfg, til)):
            src = kern.get_kernel_source()
            body = src[src.index("__global__") :]
            assert ("tilert_e2m1x2_ord(" in body) == (order == "decode")
            assert ("tilert_e2m1x2_lh(" in body) == (order == "published")
            lib = sass.library_of(src, common.cache_dir())
            if lib is not None and sass.find_nvdisasm():
                codes[order, i] = sass.disassemble(lib)
    for i in range(2):
        if ("decode", i) in codes:
            dec, pub = codes["decode", i], codes["published", i]
            assert "LDL" not in dec and "STL" not in dec, "registers spilled to local memory"
            mmas = dec.count("HMMA")
            assert mmas and _integer_ops(dec) <= _integer_ops(pub) - 4 * mmas, (_integer_ops(dec), _integer_ops(pub))


@needs_toolchain
@pytest.mark.timeout(900)
def test_bulk_expert_tasks_compile_for_sm90a(monkeypatch):
    # the weights by cp.async.bulk from warp 0 (UBLKCP), an mbarrier wait per stage, a barrier per
    # stage before its slot is refilled; x and scales still by cp.async
    from tilert.kernels import sass

    monkeypatch.setenv(moe.LOADS_ENV, "bulk")
    H, In, EL, k = MIMO_SHAPE
    til = moe.tiling(8, H, In, EL, k, body="gemv")
    cfg = moe.Config(8, H, In, EL, EL, k)
    for kern, nx, c in zip(moe.compiled_gemv_tasks(cfg, til), (1, 2), (til.gemv.gu, til.gemv.down)):
        src = kern.get_kernel_source()
        body = src[src.index("__global__") :]
        assert "tilert_bulk_g2s(" in body and "tilert_mbar_wait(" in body and "tilert_mbar_init(" in body
        assert "tilert_cp_async16(" in body  # x and the scales
        dyn = _dynamic_smem(kern.get_host_source())
        assert dyn is None or dyn <= gemv.item_smem_bytes(c, nx), (dyn, gemv.item_smem_bytes(c, nx))
        lib = sass.library_of(src, common.cache_dir())
        if lib is not None and sass.find_nvdisasm():
            code = sass.disassemble(lib)
            assert "UBLKCP" in code and "HMMA" in code and not sass.odd_descriptors(code)
            assert "LDL" not in code and "STL" not in code, "registers spilled to local memory"


# --- GPU -------------------------------------------------------------------------------------

MIMO_CASES = [(1, 1), (1, 8), (3, 5), (8, 7), (8, 48), (12, 20)]  # (tokens, active experts)
TINY_TOKENS = [1, 4, 16]


def test_precompile_script_builds_these_tests_kernels():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "precompile_gpu.py"
    spec = importlib.util.spec_from_file_location("precompile_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = {(t, "mimo") for t, _ in MIMO_CASES} | {(t, "tiny") for t in TINY_TOKENS}
    assert set(mod.MOE_GEMV_TASKS) == want
    jobs = mod.moe_gemv_jobs()
    assert all(env["TILERT_MOE_BODY"] == "gemv" for _, env in jobs)
    assert {(j[0], j[1], j[2], j[5]) for j, _ in jobs} >= {("mimo-v2.5-pro", 1, "decode", 4), ("mimo-v2.5-pro", 8,
                                                           "verify", 4)}  # fmt: skip
    # --mxfp4-decode: the decode-order GPU tests' kernels
    from tests.kernels.test_gemv import DECODE_ORDER_M
    from tests.kernels.test_mxfp4_gemm import DECODE_ORDER_SHAPES

    assert mod.DECODE_ORDER_MOE_T == tuple(sorted({t for t, _ in DECODE_ORDER_CASES}))
    assert mod.DECODE_ORDER_GEMV_M == DECODE_ORDER_M and list(mod.DECODE_ORDER_GEMM) == DECODE_ORDER_SHAPES


@pytest.mark.gpu
@pytest.mark.parametrize("loads", moe.LOADS)
@pytest.mark.parametrize(("tokens", "active"), MIMO_CASES)
def test_expert_tasks_match_reference_at_mimo_shapes(monkeypatch, tokens, active, loads):
    # 1 active expert: most tasks run one item or none; 48: every task streams ~48 gate/up and ~36
    # down items back to back through several slots (Hb restaged per slot)
    monkeypatch.setenv(moe.LOADS_ENV, loads)
    eh, ey = moe.check_gemv_tasks(tokens, *MIMO_SHAPE, active=active)
    assert eh < TOL_H and ey < TOL_Y, (eh, ey)


DECODE_ORDER_CASES = [(1, 8), (8, 48), (12, 20)]  # (tokens, active experts)


@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "active"), DECODE_ORDER_CASES)
def test_expert_tasks_in_decode_order_match_reference(monkeypatch, tokens, active):
    # TILERT_MXFP4_ORDER=decode: the weights quantised into the decode word order, the tasks built
    # with its decode (tilert_e2m1x2_ord)
    monkeypatch.setenv(mxfp4.ORDER_ENV, "decode")
    eh, ey = moe.check_gemv_tasks(tokens, *MIMO_SHAPE, active=active)
    assert eh < TOL_H and ey < TOL_Y, (eh, ey)


@pytest.mark.gpu
@pytest.mark.parametrize("loads", moe.LOADS)
@pytest.mark.parametrize("tokens", TINY_TOKENS)
def test_expert_tasks_match_reference_at_tiny_shapes(monkeypatch, tokens, loads):
    monkeypatch.setenv(moe.LOADS_ENV, loads)
    til = moe.tiling(tokens, *TINY_SHAPE, body="gemv")
    eh, ey = moe.check_gemv_tasks(tokens, *TINY_SHAPE, active=til.max_slots)
    assert eh < TOL_H and ey < TOL_Y, (eh, ey)
