"""The tile pass uses the TileLang kernels' own tile coordinates (so a persistent kernel can run their
bodies straight from a task row): fused MoE (tilert/kernels/moe.py launch grids, grouped by
`moe.tiling`) and attention (AttnConfig rows / block_m / splits). No GPU, no tilelang."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tilert.ir.graph import Graph
from tilert.ir.opset.fused import AttentionBlockAttrs
from tilert.ir.opset.moe import expected_experts
from tilert.kernels import moe, switches
from tilert.kernels.attention import AttnConfig, supports
from tilert.kernels.attention import tiling as attention_tiling
from tilert.kernels.common import cdiv
from tilert.kernels.mxfp4_gemm import BLOCK_N
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.passes import PassContext, run_passes
from tilert.passes.manager import passes_until
from tilert.passes.tile import OpTiles, Read, slot_busy


def tiled(model: str, tokens: int, world: int, topk: str | None = None) -> tuple[Graph, list[OpTiles]]:
    """The rank-0 graph and its tiles after the tile pass (topk: TILERT_MOE_TOPK for the build, else
    the environment's)."""
    mode = "decode" if tokens == 1 else "verify"
    g = build_step_graph(load_config(model), tokens=tokens, max_seq=4096, mode=mode)
    ctx = PassContext(world=world, max_seq=4096)
    with switches.applied({moe.TOPK_ENV: topk} if topk else {}):
        graphs = run_passes(g, ctx, passes_until("tile"))
    return graphs[0], ctx.results["tile"][0]


CASES = [("mimo-v2.5-pro", 1, 8), ("mimo-v2.5-pro", 8, 8), ("tiny", 4, 1), ("tiny", 4, 2)]
_TILED: dict[tuple, tuple[Graph, list[OpTiles]]] = {}


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-T{c[1]}-w{c[2]}")
def case(request: Any) -> tuple[Graph, list[OpTiles]]:
    # the top-k in the router's last arrival (the default task: test_moe_waits_with_a_topk_task)
    if request.param not in _TILED:
        _TILED[request.param] = tiled(*request.param, topk="router")
    return _TILED[request.param]


def test_tile_pass_imports_no_tilelang() -> None:
    code = ("import sys; from tests.passes.test_tile_kernels import tiled; tiled('tiny', 4, 1); "
            "assert 'tilelang' not in sys.modules, 'tilelang imported'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_moe_tasks_are_the_kernel_grids(case: tuple[Graph, list[OpTiles]]) -> None:
    g, tiles = case
    nodes = [(n, t) for n, t in zip(g.nodes, tiles) if n.op.startswith("fused_moe_")]
    assert nodes
    n, t = nodes[0]
    x, gate, gu, dn = (g.values[n.inputs[i]] for i in (0, 1, 3, 4))
    (T, H), E, In, EL, k = x.shape, gate.shape[0], dn.shape[2], n.a.n_local, n.a.top_k
    assert gu.shape[1] == 2 * In
    cfg = moe.Config(T, H, In, E, EL, k)
    geo = moe.tiling(T, H, In, EL, k)
    assert geo.max_slots == cfg.max_slots and geo.down_split == cfg.down_split
    # TILERT_MOE_TOPK=router: the top-k runs in the router's last-arriving task, no stage of its own
    geo = moe.tiling(T, H, In, EL, k, topk="router")
    assert [s.opcode for s in t.stages] == ["MOE_ROUTER", "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE"] == list(geo.stages)
    router, up, down, red = t.stages
    assert router.coords == [(e, 0, 0) for e in range(cdiv(E, moe.ROUTER_E))]  # moe_router grid
    assert router.tail is not None and router.tail[0] == "MOE_TOPK"
    # gate/up and down tasks stride over the active items: for every Count, each item exactly once
    assert up.coords == [(j, 0, 0) for j in range(geo.gu_tasks)] and geo.gu_tasks <= moe.MOE_TASKS
    assert down.coords == [(j, 0, 0) for j in range(geo.down_tasks)] and geo.down_tasks <= moe.MOE_TASKS
    assert geo.gu_tiles == cdiv(In, geo.gu_width) and geo.down_tiles == cdiv(H, geo.down_rows)
    if geo.gemv is None:  # the mainloop body: 8 h columns (16 rows) a gate/up item, 16 outputs a down item
        assert geo.gu_width == moe.GU_COLS and geo.down_rows == BLOCK_N
    for count in range(geo.max_slots + 1):
        gu_items = [it for j in range(geo.gu_tasks) for it in geo.gu_items(j, count)]
        assert sorted(gu_items) == [(s, t) for s in range(count) for t in range(geo.gu_tiles)]
        assert max((len(geo.gu_items(j, count)) for j in range(geo.gu_tasks)), default=0) <= geo.gu_steps
        dn_items = [it for j in range(geo.down_tasks) for it in geo.down_items(j, count)]
        assert sorted(dn_items) == [(s, t, q) for s in range(count) for t in range(geo.down_tiles)
                                    for q in range(geo.down_split)]  # fmt: skip
        assert max((len(geo.down_items(j, count)) for j in range(geo.down_tasks)), default=0) <= geo.down_steps
    assert [i for t in range(geo.gu_tiles) for i in range(*geo.gu_cols(t))] == list(range(In))
    assert [i for t in range(geo.down_tiles) for i in range(*geo.down_cols(t))] == list(range(H))
    assert [c for c, _, _ in red.coords] == list(range(len(red)))  # reduce: always, column blocks
    assert red.collective == (n.a.reduce and n.a.world > 1)


def _moe_stages(tiles: list[OpTiles], g: Graph) -> tuple[Any, dict[str, Any]]:
    n, t = next((n, t) for n, t in zip(g.nodes, tiles) if n.op.startswith("fused_moe_"))
    return n, {s.opcode: s for s in t.stages}


def test_moe_waits(case: tuple[Graph, list[OpTiles]]) -> None:
    """gate/up waits on every router task (the last to arrive ran the top-k) and x; down on every
    gate/up task; reduce on every down task."""
    g, tiles = case
    n, st = _moe_stages(tiles, g)
    assert list(st) == ["MOE_ROUTER", "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE"]
    assert all(r[0].src == 0 for r in st["MOE_ROUTER"].reads)
    assert all({r.src for r in rd} == {-1, 0} and all(r.lo is None for r in rd) for rd in st["MOE_GATE_UP"].reads)
    assert all(rd == (Read(-2),) for rd in st["MOE_DOWN"].reads)
    assert st["MOE_GATE_UP"].chunks == st["MOE_DOWN"].chunks == 1
    for rd in st["MOE_REDUCE"].reads:
        assert rd[0] == Read(-3) and len(rd) == 1 + n.a.residual


def test_moe_waits_with_a_topk_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """TILERT_MOE_TOPK=task (the default): a MOE_TOPK task waits on every router task (which zero Y
    before any down atomics), gate/up on the top-k and x, no tail on the router stage."""
    monkeypatch.delenv(moe.TOPK_ENV, raising=False)
    g, tiles = tiled("tiny", 4, 2)
    n, st = _moe_stages(tiles, g)
    assert list(st) == ["MOE_ROUTER", "MOE_TOPK", "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE"]
    assert st["MOE_ROUTER"].tail is None and st["MOE_TOPK"].coords == [(0, 0, 0)]
    assert st["MOE_TOPK"].reads == [(Read(-1),)]
    assert all({r.src for r in rd} == {-2, 0} and all(r.lo is None for r in rd) for rd in st["MOE_GATE_UP"].reads)
    assert all(rd == (Read(-3),) for rd in st["MOE_DOWN"].reads)
    for rd in st["MOE_REDUCE"].reads:
        assert rd[0] == Read(-4) and len(rd) == 1 + n.a.residual


def test_a_topk_place_that_does_not_exist_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(moe.TOPK_ENV, "gate")
    with pytest.raises(ValueError, match="TILERT_MOE_TOPK='gate'"):
        moe.tiling(8, 6144, 2048, 48, 8)


def test_moe_costs_are_expected_values() -> None:
    """Slot costs weigh by P(slot active); their sum is the expected number of routed local experts."""
    for T, k, E, EL in ((1, 8, 384, 48), (8, 8, 384, 48), (4, 2, 8, 8), (16, 8, 256, 256)):
        busy = slot_busy(T, k, E, EL, min(EL, T * k))
        assert all(a >= b for a, b in zip(busy, busy[1:])) and 0.0 <= busy[-1] <= busy[0] <= 1.0
        assert math.isclose(sum(busy), expected_experts(T, k, E) * EL / E, rel_tol=0.02, abs_tol=1e-3)


def test_attention_tiles_are_the_kernel_config(case: tuple[Graph, list[OpTiles]]) -> None:
    g, tiles = case
    seen = 0
    for n, t in zip(g.nodes, tiles):
        if n.op != "attention_block":
            continue
        q, kc = g.values[n.inputs[0]], g.values[n.inputs[3]]
        T, Hkv = q.shape[0], kc.shape[0]
        cfg = AttnConfig.for_node(n.a, T, persistent=True) if supports(n.a, T, persistent=True) is None else None
        rows, bm, splits = attention_tiling(n.a, T, Hkv)
        if cfg is not None:
            assert isinstance(cfg, AttnConfig) and (rows, bm, splits) == (cfg.rows, cfg.block_m, cfg.splits)
            seen += 1
        split = t.stages[0]
        assert sorted(split.coords) == [(h, rb, s) for h in range(Hkv) for rb in range(cdiv(rows, bm))
                                        for s in range(splits + 1)]  # fmt: skip
    kernel = load_config(g.meta["model"]).head_dim % 16 == 0
    assert bool(seen) == kernel  # mimo: the kernel covers every layer; tiny (head_dim 24): the fallback


def test_attention_tasks_are_the_persistent_bodies_row_blocks() -> None:
    """mimo verify B=8: 128 query rows per kv head -> one 128-row block (the persistent body's), 128
    splits in full layers, window / 64 in SWA layers; a drafter block (non-causal) the same. B=16: two
    row blocks, 64 splits."""
    a = AttentionBlockAttrs(heads=16, kv_heads=1, head_dim=192, v_head_dim=128, rope_dim=64, theta=1e7, scale=0.07)
    assert attention_tiling(a, 8, 1) == (128, 128, 128)
    assert attention_tiling(a, 16, 1) == (256, 128, 64)
    assert attention_tiling(replace(a, window=128), 8, 1) == (128, 128, 2)
    assert attention_tiling(replace(a, causal=False), 8, 1) == (128, 128, 128)
