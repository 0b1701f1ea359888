"""Pass manager, shard details, fusion results, tile/schedule tables and memory plans."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from tests.passes.helpers import run_counter_vm
from tilert.abi import OPCODES, TASK_FIELDS
from tilert.ir.graph import Graph, IRError
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config, parse_config
from tilert.passes import PIPELINE, PassContext, ShardError, run_passes, shard_for_ranks
from tilert.passes.manager import Pass
from tilert.passes.plan_memory import PlanDoesNotFit

F = {f: i for i, f in enumerate(TASK_FIELDS)}


@pytest.fixture(scope="module")
def tiny_ctx() -> tuple[list[Graph], PassContext]:
    g = build_step_graph(load_config("tiny"), tokens=4, max_seq=64, mode="verify")
    ctx = PassContext(world=2, max_seq=64)
    return run_passes(g, ctx), ctx


def test_pipeline_is_one_ordered_list() -> None:
    names = [p.name for p in PIPELINE]
    assert names[:2] == ["infer_shapes", "shard"] and names[-3:] == ["tile", "schedule", "plan_memory"]
    assert len(set(names)) == len(names)


def test_dump_ir_and_print_after(tmp_path, capsys) -> None:  # noqa: ANN001
    g = build_step_graph(load_config("tiny"), tokens=1, max_seq=32)
    run_passes(g, PassContext(world=2, dump_ir=tmp_path, print_after="fuse_moe"))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "01-infer_shapes.txt" in files and "04-fuse_moe.r1.txt" in files
    assert "fused_moe_mxfp4" in (tmp_path / "04-fuse_moe.r0.txt").read_text()
    assert "# after fuse_moe" in capsys.readouterr().out
    with pytest.raises(IRError, match="no pass named"):
        run_passes(g, PassContext(print_after="nope"))


def test_new_pass_is_one_line_and_verified() -> None:
    def drop_last(graph: Graph, ctx: PassContext) -> Graph:  # breaks the graph: output never defined
        out = graph.copy()
        out.nodes = out.nodes[:-1]
        return out

    g = build_step_graph(load_config("tiny"), tokens=1, max_seq=32)
    with pytest.raises(IRError, match="after pass 'drop_last'"):
        run_passes(g, PassContext(), [*PIPELINE[:1], Pass("drop_last", drop_last)])


def test_shard_errors_name_the_field() -> None:
    g = build_step_graph(load_config("tiny"), tokens=1, max_seq=32)
    with pytest.raises(ShardError, match="num_attention_heads"):
        shard_for_ranks(g, 3)
    raw = json.loads((resources.files("tilert.models") / "configs" / "tiny.json").read_text())
    cfg = parse_config({**raw, "n_routed_experts": 6}, name="six-experts")
    with pytest.raises(ShardError, match="n_routed_experts"):
        shard_for_ranks(build_step_graph(cfg, tokens=1, max_seq=32), 4)


def test_shard_replicates_kv_heads_and_pads_vocab() -> None:
    cfg = load_config("tiny")  # 4 q heads, 2 kv heads, vocab 160
    graphs = shard_for_ranks(build_step_graph(cfg, tokens=1, max_seq=32), 4)
    assert [x.op for x in graphs[0].nodes] == [x.op for x in graphs[3].nodes]
    for r, g in enumerate(graphs):
        kc = g.values["model.layers.0.self_attn.k_cache"]
        assert kc.shape[0] == 1 and str(kc.sharding) == "S(0)"
        src = g.values["model.layers.0.self_attn.k_proj"].src()["slice"]
        assert src == (0, (r // 2) * 24, (r // 2 + 1) * 24)  # q heads r -> kv head r // 2
        assert g.values["model.layers.1.mlp.experts.gate_up_proj"].src()["expert_range"] == (2 * r, 2 * r + 2)
    assert graphs[0].values["logits"].shape == (1, 160)
    g8 = shard_for_ranks(build_step_graph(load_config("tiny"), tokens=1, max_seq=32), 2)[1]
    assert g8.values["lm_head"].src()["slice"] == (0, 80, 160)


def test_fusion_leaves_no_dequant(tiny_ctx) -> None:  # noqa: ANN001
    graphs, _ = tiny_ctx
    ops = graphs[0].op_counts()
    assert "dequant" not in ops and "rms_norm" not in ops and "add" not in ops
    assert ops["fused_moe_mxfp4"] == 3 and ops["attention_block"] == 4 and ops["lm_head_accept"] == 1


def test_task_table_runs_on_a_counter_vm(tiny_ctx) -> None:  # noqa: ANN001
    """Execute the per-SM queues as the persistent kernel would (round robin over SMs, a task runs
    once its waits are met): every task runs, nothing deadlocks, every wait sees finished producers."""
    graphs, ctx = tiny_ctx
    s = ctx.results["schedule"][0]
    ran, counters = run_counter_vm(s.table, s.counter_expected)
    assert ran == s.tasks and (counters == s.counter_expected).all()


def test_moe_down_waits_only_for_its_slot(tiny_ctx) -> None:  # noqa: ANN001
    """A down task (slot, n tile, k split) waits on one counter: the gate/up tasks of its own slot."""
    _, ctx = tiny_ctx
    t = ctx.results["schedule"][0].table.reshape(-1, len(TASK_FIELDS))
    down = t[t[:, F["opcode"]] == OPCODES["MOE_DOWN"]]
    up = t[t[:, F["opcode"]] == OPCODES["MOE_GATE_UP"]]
    slot_counter = {(int(r[F["op"]]), int(r[F["c0"]])): int(r[F["signal"]]) for r in up}
    assert len(down) and (down[:, F["wait0_count"]] == 1).all() and (down[:, F["wait1_counter"]] < 0).all()
    for r in down:
        assert r[F["wait0_counter"]] == slot_counter[int(r[F["op"]]), int(r[F["c0"]])]


def test_memory_reuses_buffers_and_reports_fit(tiny_ctx) -> None:  # noqa: ANN001
    graphs, ctx = tiny_ctx
    m = ctx.results["plan_memory"][0]
    acts = sum(size for _, size in m.buffers.values())
    assert m.activations < acts  # some buffers are shared
    assert m.weights == sum(v.nbytes for v in graphs[0].by_role("param"))
    cfg = load_config("mimo-v2.5-pro")
    with pytest.raises(PlanDoesNotFit, match=r"needs .* GiB per GPU .* 139 GiB usable"):
        run_passes(build_step_graph(cfg, tokens=1, max_seq=4096), PassContext(world=1))
