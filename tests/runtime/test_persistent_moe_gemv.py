"""The persistent step with the GEMV expert body (TILERT_MOE_BODY=gemv): its step kernels compile
for sm_90a without a GPU and stream the expert weights through the GEMV's rings; the plan VM runs
the GEMV body's item split to the reference outputs; on a Hopper GPU the steps match the reference
executor. The default body's kernels do not change (tests/runtime/test_persistent_step_compile.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.runtime.test_plan_vm import check, compiled_steps, run_vm
from tilert.kernels import common, gemv, moe
from tilert.models.config import load_config
from tilert.numerics import mxfp4

needs_toolchain = pytest.mark.skipif(common.toolchain_reason() is not None, reason=str(common.toolchain_reason()))


def moe_bodies(st) -> set[str]:
    """The expert body of each MoE node of a PersistentStep ("mainloop" / "gemv")."""
    return {p.key[2].body for p in st.programs if p.key[0] == "moe"}


BODY_START = r"\(code == (\d+)\)|\btilert_body\((\d+)\)"  # a chain's test, or a binary search's body marker


def has_body(src: str, opcode: str) -> bool:
    """Whether the step kernel's dispatch has a body for `opcode` (either dispatch form)."""
    from tilert.abi import OPCODES

    return any(int(m.group(1) or m.group(2)) == OPCODES[opcode] for m in re.finditer(BODY_START, src))


def moe_branch(src: str, opcode: str) -> str:
    """The generated source of one opcode's branch of the step kernel (up to the next opcode's)."""
    from tilert.abi import OPCODES

    code = OPCODES[opcode]
    marks = [(m.start(), int(m.group(1) or m.group(2))) for m in re.finditer(BODY_START, src)]
    starts = [at for at, c in marks if c == code]
    if not starts:
        raise ValueError(f"no {opcode} branch in the kernel source")
    end = next((at for at, c in marks if at > starts[0] and c != code), len(src))
    return src[starts[0] : end]


@needs_toolchain
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("model", "tokens", "max_seq", "world"), [
    ("tiny-gpu", 4, 256, 1),
    ("mimo-v2.5-pro", 8, 4160, 8),
])  # fmt: skip
def test_verify_step_with_gemv_experts_compiles(monkeypatch, model, tokens, max_seq, world):
    from tilert.engine.persistent import precompile
    from tilert.kernels import sass

    monkeypatch.setenv(moe.BODY_ENV, "gemv")
    st = precompile(load_config(model), tokens, "verify", max_seq, world)
    assert moe_bodies(st) == {"gemv"}
    src = st.kernel.get_kernel_source()
    assert src.count("#define TILERT_GEMV_PRELUDE") == 1  # the one prelude every body imports
    for opcode in ("MOE_GATE_UP", "MOE_DOWN"):
        body = moe_branch(src, opcode)
        # the weights stream through per-thread cp.async rings (waited on per thread, read back by
        # tilert_lds16) and are decoded in registers; the mainloop's register loads are gone
        assert "tilert_cp_async16(" in body and "tilert_cp_async_wait<" in body and "tilert_lds16" in body
        decode = "tilert_e2m1x2_ord(" if mxfp4.order_choice() == "decode" else "tilert_e2m1x2_lh("  # the word order
        assert decode in body and "tilert_ld16_ef" not in body, opcode
    assert "AtomicAdd(" in moe_branch(src, "MOE_DOWN")  # partial x TokW into Y
    lib = sass.library_of(src, common.cache_dir())
    assert lib is not None
    if sass.find_nvdisasm():
        code = sass.disassemble(lib)
        assert "LDGSTS" in code and not sass.odd_descriptors(code)


@needs_toolchain
@pytest.mark.timeout(900)
def test_a_step_with_bulk_expert_loads_compiles_with_the_bulk_prelude(monkeypatch):
    # TILERT_MOE_LOADS=bulk: the expert tasks copy their weights with cp.async.bulk into the mbarrier
    # ring, and the step imports the prelude that holds its helpers (a superset of the linear one)
    from tilert.engine.persistent import precompile

    monkeypatch.setenv(moe.LOADS_ENV, "bulk")
    st = precompile(load_config("tiny-gpu"), 4, "verify", 256, 1)
    src = st.kernel.get_kernel_source()
    assert src.count("#define TILERT_GEMV_BULK_PRELUDE") == 1 and src.count("#define TILERT_GEMV_PRELUDE") == 1
    for opcode in ("MOE_GATE_UP", "MOE_DOWN"):
        body = moe_branch(src, opcode)
        assert "tilert_bulk_g2s(" in body and "tilert_mbar_wait(" in body, opcode
    assert "tilert_bulk_g2s(" not in moe_branch(src, "LINEAR_FP8")  # the linears keep their rings


def test_the_default_step_runs_the_gemv_body(monkeypatch):
    # TILERT_MOE_BODY=mainloop: the MoE programs are the mainloop's and ask for no other prelude; no
    # switch: the GEMV expert tasks, with the GEMV's prelude
    from tilert.engine.persistent import compile_step
    from tilert.models.builder import build_step_graph
    from tilert.runtime.eager.synthetic import meta_params
    from tilert.runtime.kinds import for_node
    from tilert.runtime.persistent.program import Bindings

    monkeypatch.setenv(moe.BODY_ENV, "mainloop")
    cfg = load_config("tiny-gpu")
    rg, _ = compile_step(build_step_graph(cfg, tokens=4, mode="verify", max_seq=256), 256)
    b = Bindings(rg, meta_params(rg), torch.device("meta"))
    progs = [for_node(n.op).program(rg, n, b, 132) for n in rg.nodes if n.op.startswith("fused_moe")]
    assert progs and all(p.prelude is None and p.key[2].gemv is None for p in progs)
    monkeypatch.delenv(moe.BODY_ENV)
    progs = [for_node(n.op).program(rg, n, b, 132) for n in rg.nodes if n.op.startswith("fused_moe")]
    assert all(p.prelude == gemv.GEMV_PRELUDE and p.key[2].gemv is not None for p in progs)


@pytest.mark.parametrize(("model", "tokens", "world"), [("tiny-gpu", 4, 1), ("mimo-v2.5-pro", 8, 8)])
def test_the_switch_keeps_the_tasks(monkeypatch, model, tokens, world):
    # the same MoE tasks either way (placement may follow the costs), so a table compiled without the
    # switch runs the GEMV body too: benchmarks/step_variants.py builds every variant on one table
    from tilert.abi import FIELD, OPCODES
    from tilert.engine.persistent import compile_step
    from tilert.models.builder import build_step_graph

    cfg = load_config(model)
    if world > 1:
        cfg = cfg.first_layers(2)
    codes = {OPCODES[o] for o in ("MOE_GATE_UP", "MOE_DOWN")}
    tasks = {}
    for body in moe.BODIES:
        monkeypatch.setenv(moe.BODY_ENV, body)
        _, sched = compile_step(build_step_graph(cfg, tokens=tokens, mode="verify", max_seq=256), 256, world)
        rows = sched.table.reshape(-1, sched.table.shape[-1])
        rows = rows[np.isin(rows[:, FIELD["opcode"]], list(codes))]
        tasks[body] = sorted(tuple(int(r[FIELD[f]]) for f in ("opcode", "op", "c0", "c1", "c2")) for r in rows)
    assert tasks["gemv"] == tasks["mainloop"] and tasks["gemv"]


def test_a_step_prelude_extends_the_device_prelude():
    assert common.prelude() == common.DEVICE_PRELUDE
    with common.using_prelude(gemv.GEMV_PRELUDE):
        assert common.prelude() == gemv.GEMV_PRELUDE
    assert common.prelude() == common.DEVICE_PRELUDE
    with pytest.raises(ValueError, match="extend DEVICE_PRELUDE"):
        with common.using_prelude("__device__ int f();"):
            pass


@pytest.mark.parametrize("world", [1, 2])
def test_plan_vm_runs_the_gemv_item_split(monkeypatch, world):
    # the tables with the GEMV body's items (contiguous shares, its tile sizes) on the CPU: the
    # reference outputs, NaN-poisoned buffers, random legal order
    monkeypatch.setenv(moe.BODY_ENV, "gemv")
    cfg = load_config("tiny-gpu")
    T, H, In = cfg.dflash.block_size, cfg.hidden_size, cfg.moe_intermediate_size
    assert moe.tiling(T, H, In, cfg.n_routed_experts // world, cfg.num_experts_per_tok).gemv is not None
    case = compiled_steps(cfg, world)
    check(case, run_vm(case, "random", seed=world), f"tiny-gpu world {world}, GEMV experts")


# --- GPU -------------------------------------------------------------------------------------


def routed_weights(cfg, seed: int) -> dict[str, torch.Tensor]:
    """margin_safe_weights with each layer's selection bias permuted: every token still takes the
    same top-k experts (10 apart in bias, so no rounding can change them), but a different set in
    each layer, so the active list is not 0..k-1."""
    from tilert.models.weights import margin_safe_weights

    w = margin_safe_weights(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    for k in w:
        if k.endswith("e_score_correction_bias"):
            w[k] = w[k][torch.randperm(w[k].numel(), generator=g)]
    return w


@pytest.mark.gpu
@pytest.mark.parametrize(("tiling", "loads"), [("", "thread"), ("1.1.2/1.1.2", "thread"), ("", "bulk")],
                         ids=["picked", "two-items-a-task", "bulk-loads"])  # fmt: skip
def test_persistent_steps_with_gemv_experts_match_reference(monkeypatch, tiling, loads):
    # as test_persistent_step_gpu.py::test_persistent_steps_match_reference, with the GEMV expert
    # body: a 6-token prompt, a verify block, three decode steps. "two-items-a-task" forces 16-row
    # tiles (8 of the 16 k warps idle at H = 256), so each gate/up task streams two items back to
    # back; "bulk-loads": the weights by cp.async.bulk into the mbarrier ring (TILERT_MOE_LOADS)
    from tests.runtime.test_eager_gpu import check_prompt_verify_decode
    from tilert.engine import ReferenceBackend
    from tilert.engine.persistent import PersistentBackend

    monkeypatch.setenv(moe.BODY_ENV, "gemv")
    monkeypatch.setenv(moe.LOADS_ENV, loads)
    if tiling:
        monkeypatch.setenv(moe.TILING_ENV, tiling)
    cfg = load_config("tiny-gpu")
    w = routed_weights(cfg, int(torch.randint(0, 1000, ())))
    ref, gpu = ReferenceBackend(cfg, w, max_seq=256), PersistentBackend(cfg, w, max_seq=256)
    check_prompt_verify_decode(ref, gpu, cfg)
    steps = [p for kind, p in gpu._prepared.values() if kind == "persistent"]
    assert not gpu.fallbacks and len(steps) == 3  # prompt (6 rows), verify, decode: all persistent
    assert all(moe_bodies(st) == {"gemv"} for st in steps)
