"""The persistent cost model: per-kind task times, when a task is ready, and the list schedule's use
of them (a consumer starts a hand-over after its last producer; a task with its inputs there starts
its fixed cost after its SM frees up)."""

from __future__ import annotations

import dataclasses

import pytest

from tilert.abi import OPCODES
from tilert.gpu_specs import H100, H100_EXPERT_STREAM_SCALE, H200, TaskCost, gpu_spec_for_device, scaled_stream
from tilert.kernels import moe
from tilert.models.config import load_config
from tilert.passes.cost_model import task_ready, task_time
from tilert.passes.schedule import Task, list_schedule
from tilert.passes.tile import MOE_STAGE_BYTES, moe_expert_work
from tilert.profile.calibration import compile_rank

US = 1e-6
X_B8 = 8 * 6144 * 2  # mimo-v2.5-pro's x rows at B=8 (bf16)
SPEC = dataclasses.replace(H200, tasks={
    "LINEAR_FP8": TaskCost(2 * US, 1 * US, 3 * US, stream_bytes_per_s=10e9, bytes_per_s=20e9, flops_per_s=1e12),
    "ALL_REDUCE": TaskCost(1 * US, 1 * US, 1 * US),
    "*": TaskCost(1 * US, 1 * US, 0.0),
})  # fmt: skip


def test_task_time_adds_the_kinds_rates():
    t = task_time(SPEC, "LINEAR_FP8", nbytes=150e3, stream=100e3, flops=2e6)
    # body 3 us + 100 KB / 10 GB/s + 50 KB / 20 GB/s + 2 MFLOP / 1 TFLOP/s
    assert t.run == pytest.approx((3 + 10 + 2.5 + 2) * US)
    assert (t.fixed, t.handover) == (2 * US, 1 * US) and t.busy == pytest.approx(t.fixed + t.run)
    assert task_time(SPEC, "OP_GENERIC", 1e6, 0.0, 0.0).run == 0.0  # "*": no rate given, nothing scales


def test_collective_tasks_wait_for_peers_only_with_peers():
    peers = task_time(SPEC, "ALL_REDUCE", 0.0, 0.0, 0.0, comm=35e3, collective=True)
    assert peers.run == pytest.approx(1 * US + SPEC.collective_latency_s + 35e3 / SPEC.peer_bytes_per_sm_s)
    solo = task_time(SPEC.solo(), "ALL_REDUCE", 0.0, 0.0, 0.0, comm=35e3, collective=True)
    assert solo.run == pytest.approx(1 * US)


def test_task_ready_is_the_later_of_fetch_and_hand_over():
    assert task_ready(2.0, 1.0, sm_free=10.0, inputs_at=None) == 12.0  # waits on nothing
    assert task_ready(2.0, 1.0, sm_free=10.0, inputs_at=5.0) == 12.0  # inputs long there
    assert task_ready(2.0, 1.0, sm_free=10.0, inputs_at=20.0) == 21.0  # waits for the hand-over


def _task(stage: int, waits=(), busy: float = 5.0, fixed: float = 2.0, handover: float = 1.0) -> Task:
    return Task(OPCODES["LINEAR_FP8"], stage, (0, 0, 0), busy, stage, 0, list(waits), fixed, handover)


def test_list_schedule_hands_over_after_the_producer():
    # stage 0: a producer; stage 1: a consumer of all of stage 0; stage 2: independent work
    tasks = [_task(0, busy=5.0), _task(1, [(0, (0, 1))], busy=4.0, fixed=2.0, handover=3.0), _task(2, busy=1.0)]
    f = {"tasks": tasks, "st_chunks": [1, 1, 1]}
    queues, finish, makespan = list_schedule(f, sms=2)
    assert finish[0] == 5.0  # fetched at 2, ran 3
    # the consumer's SM is free at 1 (after the independent task) or at 0: either way it is ready
    # 3 after the producer ends, and runs its busy time less the fixed part it already paid
    assert finish[1] == pytest.approx(5.0 + 3.0 + (4.0 - 2.0))
    assert makespan == finish[1] and sorted(i for q in queues for i in q) == [0, 1, 2]
    for q in queues:  # every queue in creation order: topological, so the kernel cannot deadlock
        assert q == sorted(q)


def test_gate_up_stages_x_once_per_task_and_down_a_slot_at_a_time():
    geo = moe.tiling(8, 6144, 2048, 48, 8, body="mainloop")  # the mainloop body's items (16-row tiles)
    assert X_B8 <= MOE_STAGE_BYTES
    two, thirteen = (moe_expert_work("MOE_GATE_UP", geo, 12e6, n, n) for n in (2, 13))
    hb = 8 * moe.GU_COLS * 2  # Hb columns an item writes
    assert thirteen[1] == pytest.approx(two[1] * 13 / 2)  # the weights scale with the items
    assert thirteen[0] - thirteen[1] - (two[0] - two[1]) == pytest.approx(11 * hb)  # x once, not per item
    one, three = (moe_expert_work("MOE_DOWN", geo, 6e6, 3, s) for s in (1, 3))
    assert three[0] - one[0] == pytest.approx(2 * 8 * 2048 * 2)  # a slot's Hb rows per slot


def test_the_stage_limit_is_the_runtimes():
    from tilert.runtime.kinds.moe import MOE_STAGE_BYTES as runtime

    assert MOE_STAGE_BYTES == runtime


def test_routed_experts_set_the_expert_stream():
    cfg = load_config("tiny")
    uniform = compile_rank(cfg, 4, 1, H200, 64)
    one = compile_rank(cfg, 4, 1, H200, 64, routed=1.0)
    moe_i = uniform.moe_nodes()[0]
    up = lambda r: next(s for s in r.tiles[moe_i].stages if s.opcode == "MOE_GATE_UP")  # noqa: E731
    n = uniform.graph.nodes[moe_i]
    gu = uniform.graph.values[n.inputs[3]]
    per_expert = gu.nbytes / n.a.n_local
    assert sum(up(one).stream) == pytest.approx(per_expert)  # one expert's weights over the stage's tasks
    assert sum(up(uniform).stream) > per_expert  # uniform routing of 4 tokens: more than one expected
    assert one.predicted_ms < uniform.predicted_ms


def test_h100_table_covers_every_kind_and_scales_only_the_experts_streams():
    # the H100's own traces give every kind but the expert tasks, which are the H200's with their
    # HBM-stream rates scaled (their items follow a routing the by-token traces do not record)
    assert set(H100.tasks) == set(H200.tasks)
    for k in ("MOE_GATE_UP", "MOE_DOWN"):
        c, d = H200.tasks[k], H100.tasks[k]
        assert (d.fixed_s, d.handover_s, d.body_s, d.bytes_per_s) == (c.fixed_s, c.handover_s, c.body_s, c.bytes_per_s)
        assert d.stream_bytes_per_s == pytest.approx(c.stream_bytes_per_s * H100_EXPERT_STREAM_SCALE)
    assert H100.tasks["LINEAR_FP8"] != H200.tasks["LINEAR_FP8"]  # fitted, not copied
    assert scaled_stream(H200.tasks, 1.0) == dict(H200.tasks)


def test_device_names_map_to_specs():
    assert gpu_spec_for_device("NVIDIA H100 80GB HBM3") is H100
    assert gpu_spec_for_device("NVIDIA H200") is H200
    assert gpu_spec_for_device("NVIDIA A100-SXM4-80GB") is None


def test_a_mixed_step_reads_each_rows_own_sequence():
    """Slotted caches [slots, Hkv, max_seq, D]: one sequence's read is one slot's, and the floor of a
    mixed step counts a context of keys per row (each row may be its own sequence)."""
    from tilert.engine.persistent import compile_step
    from tilert.models.builder import build_step_graph
    from tilert.passes.cost_model import floor_bytes, kv_read_bytes

    cfg, ctx = load_config("tiny"), 200
    graphs = {
        (t, s): build_step_graph(cfg, tokens=t, mode="decode", max_seq=256, slots=s) for t in (1, 4) for s in (0, 5)
    }

    def attn(g):
        n = next(n for n in g.nodes if n.op == "attention")
        return n, g.values[n.inputs[1]], g.values[n.inputs[2]]

    (n_s, kc_s, vc_s), (n_u, kc_u, vc_u) = attn(graphs[1, 5]), attn(graphs[1, 0])
    assert kc_s.shape[0] == 5 and kc_s.shape[1:] == kc_u.shape
    assert kv_read_bytes(n_s, kc_s, vc_s, 1, ctx) == kv_read_bytes(n_u, kc_u, vc_u, 1, ctx) > 0
    plain = [(n, graphs[1, 0].values[n.inputs[1]], graphs[1, 0].values[n.inputs[2]])
             for n in graphs[1, 0].nodes if n.op == "attention"]  # fmt: skip
    kv1 = sum(kv_read_bytes(n, kc, vc, 1, ctx) for n, kc, vc in plain)
    kv4 = sum(kv_read_bytes(n, kc, vc, 4, ctx) for n, kc, vc in plain)
    floor = {k: floor_bytes(compile_step(g, 256)[0], ctx) for k, g in graphs.items()}  # attention_block nodes
    # 3 more rows: 3 more sequences' keys when mixed, 3 more keys of one sequence when not; the
    # rest (weights the extra rows route to, inputs) grows alike
    extra = (floor[4, 5] - floor[1, 5]) - (floor[4, 0] - floor[1, 0])
    assert abs(extra - (3 * kv1 - (kv4 - kv1))) < 0.02 * 3 * kv1
