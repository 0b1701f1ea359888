"""The persistent step with the streaming linear body (TILERT_LINEAR_BODY=gemv): the switch keeps the
task table (the plan VM runs it as before), the device table chains each SM queue's runs of one
node's tasks, the step kernels compile for sm_90a without a GPU, and on a Hopper GPU the steps
match the reference executor. The default body's programs and table do not change."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.runtime.test_persistent_moe_gemv import moe_branch
from tests.runtime.test_plan_vm import check, compiled_steps, run_vm
from tilert.abi import FIELD, OPCODES
from tilert.kernels import common, gemv, moe
from tilert.kernels import linear_fused as lf
from tilert.models.config import load_config
from tilert.runtime.kinds.linear import CHAIN_SPLITS, CHAIN_TILES, chain_word
from tilert.runtime.persistent.program import NodeProgram
from tilert.runtime.persistent.step import PersistentStep

needs_toolchain = pytest.mark.skipif(common.toolchain_reason() is not None, reason=str(common.toolchain_reason()))


def linear_bodies(st) -> set[str]:
    """The body of each LINEAR_FP8 program of a PersistentStep ("fused" / "gemv")."""
    return {"gemv" if p.key[0] == "linear_stream" else "fused" for p in st.programs if "LINEAR_FP8" in p.opcodes}


def meta_programs(model: str, tokens: int, world: int = 1):
    from tilert.engine.persistent import compile_step
    from tilert.models.builder import build_step_graph
    from tilert.runtime.eager.synthetic import meta_params
    from tilert.runtime.kinds import for_node
    from tilert.runtime.persistent.program import Bindings

    cfg = load_config(model)
    if world > 1:
        cfg = cfg.first_layers(2)
    mode = "verify" if tokens > 1 else "decode"
    rg, sched = compile_step(build_step_graph(cfg, tokens=tokens, mode=mode, max_seq=256), 256, world)
    b = Bindings(rg, meta_params(rg), torch.device("meta"))
    return rg, sched, [for_node(n.op).program(rg, n, b, 132) for n in rg.nodes]


@pytest.mark.parametrize(("model", "tokens", "world"), [("tiny-gpu", 4, 1), ("mimo-v2.5-pro", 8, 8)])
def test_switch_takes_the_fp8_linears_only(monkeypatch, model, tokens, world):
    monkeypatch.setenv(lf.BODY_ENV, "fused")
    _, _, progs = meta_programs(model, tokens, world)
    assert all(p.key[0] != "linear_stream" and p.chain is None for p in progs)
    assert not any(p.prelude == gemv.LINEAR_PRELUDE for p in progs)
    monkeypatch.delenv(lf.BODY_ENV)  # the default: the streaming GEMV
    rg, _, progs = meta_programs(model, tokens, world)
    fp8 = [p for n, p in zip(rg.nodes, progs) if n.op == "linear_fp8"]
    assert fp8 and all(p.key[0] == "linear_stream" and p.prelude == gemv.LINEAR_PRELUDE and p.chain for p in fp8)
    others = [p for n, p in zip(rg.nodes, progs) if n.op != "linear_fp8"]
    assert not any(p.key[0] == "linear_stream" for p in others)  # the LM head and bf16 linears keep theirs


@pytest.mark.parametrize(("model", "tokens", "world"), [("tiny-gpu", 1, 1), ("mimo-v2.5-pro", 8, 8)])
def test_the_switch_keeps_the_tasks(monkeypatch, model, tokens, world):
    # the same table either way: the streaming body runs the plan's tiles (benchmarks/step_variants.py
    # builds every variant on one table; the plan VM's tiles are the body's)
    tables = {}
    for body in lf.BODIES:
        monkeypatch.setenv(lf.BODY_ENV, body)
        _, sched, _ = meta_programs(model, tokens, world)
        tables[body] = sched.table
    assert np.array_equal(tables["fused"], tables["gemv"])


def test_plan_vm_runs_the_tables_with_the_switch(monkeypatch):
    monkeypatch.setenv(lf.BODY_ENV, "gemv")
    case = compiled_steps(load_config("tiny-gpu"), 1)
    check(case, run_vm(case, "random", seed=3), "tiny-gpu, streaming linears")


def decode_chain(c1: int) -> dict[str, int]:
    """The fields of a chain word as runtime/kinds/linear.py's body decodes them."""
    return {"prefetched": c1 % 2, "has_next": c1 // 2 % 2, "b": c1 // 4 % 2, "base": c1 // 8 % 16,
            "n_tile": c1 // 128 % CHAIN_TILES, "k_split": c1 // (1 << 21)}  # fmt: skip


def test_chain_words_round_trip():
    cfg = gemv.Config("fp8", 8, 192, 6144, wr=2, g=2, split=6, depth=3)  # 2 chunks a warp, a 3-slot ring
    assert decode_chain(chain_word(cfg, 0, None)) == dict(prefetched=0, has_next=0, b=0, base=0, n_tile=0, k_split=0)
    w = decode_chain(chain_word(cfg, 5, (CHAIN_TILES - 1, CHAIN_SPLITS - 1)))
    assert w == dict(prefetched=1, has_next=1, b=1, base=5 * cfg.items % cfg.depth, n_tile=CHAIN_TILES - 1,
                     k_split=CHAIN_SPLITS - 1)  # fmt: skip
    assert chain_word(cfg, 5, (CHAIN_TILES - 1, CHAIN_SPLITS - 1)) < 2**31


def test_device_table_chains_runs_of_one_node():
    # one SM queue: node 0 x3, node 1, node 0, an empty row; only node 0's program chains
    code = OPCODES["LINEAR_FP8"]
    rows = [(code, 0, 1, 0, 2), (code, 0, 2, 0, 0), (code, 0, 2, 0, 1), (code, 1, 0, 0, 0), (code, 0, 3, 0, 0)]
    table = np.zeros((1, 6, len(FIELD)), dtype=np.int32)
    for t, (opc, op, c0, c1, c2) in enumerate(rows):
        for k, v in zip(("opcode", "op", "c0", "c1", "c2"), (opc, op, c0, c1, c2)):
            table[0, t, FIELD[k]] = v
    seen = []

    def chain(name, c, run, nxt):
        seen.append((name, c, run, nxt))
        return c[0], 100 + run + (0 if nxt is None else 10 * nxt[0]), c[2]

    progs = [NodeProgram(("a",), [], dict, chain=chain), NodeProgram(("b",), [], dict)]
    out = PersistentStep._device_table(SimpleNamespace(programs=progs, table=table))
    assert [s[2:] for s in seen] == [(0, (2, 0, 0)), (1, (2, 0, 1)), (2, None), (0, None)]
    assert list(out[0, :, FIELD["c1"]]) == [120, 121, 102, 0, 100, 0]
    assert np.array_equal(np.delete(out, FIELD["c1"], axis=2), np.delete(table, FIELD["c1"], axis=2))
    plain = [NodeProgram(("a",), [], dict), NodeProgram(("b",), [], dict)]
    assert PersistentStep._device_table(SimpleNamespace(programs=plain, table=table)) is table  # the default


CHAIN_SMS = 4  # tiny-gpu scheduled over 4 SM queues: some run several tasks of one linear back to back


def meta_step(tokens: int, mode: str, sms: int | None = None) -> PersistentStep:
    """tiny-gpu's step kernel built from meta tensors (as engine.persistent.precompile), over `sms`
    SM queues (default 132)."""
    from tilert.engine.persistent import compile_step
    from tilert.models.builder import build_step_graph
    from tilert.runtime.eager.synthetic import meta_params

    g = build_step_graph(load_config("tiny-gpu"), tokens=tokens, mode=mode, max_seq=256)
    rg, sched = compile_step(g, 256, 1, sms=sms)
    return PersistentStep(rg, sched.table, sched.counter_expected, meta_params(rg), device="meta",
                          num_sms=sched.table.shape[0])  # fmt: skip


@needs_toolchain
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("tokens", "mode", "sms"), [(1, "decode", None), (4, "verify", CHAIN_SMS)])
def test_step_with_gemv_linears_compiles(monkeypatch, tokens, mode, sms):
    from tilert.kernels import sass

    monkeypatch.setenv(lf.BODY_ENV, "gemv")
    st = meta_step(tokens, mode, sms)
    assert linear_bodies(st) == {"gemv"}
    src = st.kernel.get_kernel_source()
    assert src.count("#define TILERT_GEMV_LINEAR_PRELUDE") == 1  # the one prelude every body imports
    body = moe_branch(src, "LINEAR_FP8")
    # per-thread cp.async rings (evict-first weights), register decode, the norm prologue in shared memory
    for needle in ("tilert_cp_async16_ef(", "tilert_cp_async_wait<", "tilert_lds16", "tilert_e4m3x2_sx",
                   "tilert_norm16(", "tilert_smem_live("):  # fmt: skip
        assert needle in body, needle
    dev = st._device_table()  # what the kernel runs (st.tasks is on the meta device here)
    c1 = dev[dev[:, :, FIELD["opcode"]] == OPCODES["LINEAR_FP8"]][:, FIELD["c1"]]
    # at 132 queues no queue runs two tasks of one linear (a GEMM fills at most one wave): all plain;
    # at 4 some do, and chain (the path the GPU test's "chained" case runs)
    assert (c1 % 2 == 0).any() and ((c1 % 2 == 1).any() == (sms == CHAIN_SMS))
    lib = sass.library_of(src, common.cache_dir())
    assert lib is not None
    if sass.find_nvdisasm():
        code = sass.disassemble(lib)
        assert "LDGSTS" in code and not sass.odd_descriptors(code)


# --- GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("moe_body", "sms"), [("mainloop", None), ("gemv", None), ("mainloop", CHAIN_SMS)],
                         ids=["lgemv", "both", "chained"])  # fmt: skip
def test_persistent_steps_with_gemv_linears_match_reference(monkeypatch, moe_body, sms):
    # as test_persistent_moe_gemv.py: a 6-token prompt, a verify block, three decode steps; "chained":
    # scheduled over 4 SM queues, so tasks issue the next task's chunks (the prefetch form's chain)
    from tests.runtime.test_eager_gpu import check_prompt_verify_decode
    from tests.runtime.test_persistent_moe_gemv import routed_weights
    from tilert.engine import ReferenceBackend
    from tilert.engine.persistent import PersistentBackend

    monkeypatch.setenv(lf.BODY_ENV, "gemv")
    monkeypatch.setenv(moe.BODY_ENV, moe_body)
    cfg = load_config("tiny-gpu")
    w = routed_weights(cfg, int(torch.randint(0, 1000, ())))
    ref, gpu = ReferenceBackend(cfg, w, max_seq=256), PersistentBackend(cfg, w, max_seq=256, sms=sms)
    check_prompt_verify_decode(ref, gpu, cfg)
    steps = [p for kind, p in gpu._prepared.values() if kind == "persistent"]
    assert not gpu.fallbacks and len(steps) == 3  # prompt (6 rows), verify, decode: all persistent
    assert all(linear_bodies(st) == {"gemv"} for st in steps)
    if sms == CHAIN_SMS:
        assert any((st.tasks.cpu().numpy()[:, :, FIELD["c1"]] % 2 == 1).any() for st in steps)


def test_precompile_script_builds_the_chained_steps_at_this_queue_count():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "precompile_gpu.py"
    spec = importlib.util.spec_from_file_location("precompile_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.LINEAR_CHAIN_SMS == CHAIN_SMS
