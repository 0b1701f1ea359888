"""The full-step persistent kernel builds for sm_90a without a GPU (meta tensors, no weights): the
tiny-gpu config's decode and verify steps and rank 0 of the 8-rank mimo-v2.5-pro decode step, so a
body that stops compiling fails CI. Checks the dispatch covers every (opcode, node) of the table."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.runtime.test_persistent_moe_gemv import has_body, moe_branch
from tilert.abi import FIELD, OPCODES
from tilert.kernels import switches
from tilert.kernels.common import toolchain_reason
from tilert.models.config import load_config

pytestmark = pytest.mark.skipif(toolchain_reason() is not None, reason=str(toolchain_reason()))


@pytest.mark.parametrize(("model", "tokens", "mode", "max_seq", "world"), [
    ("tiny-gpu", 1, "decode", 256, 1),
    ("tiny-gpu", 4, "verify", 256, 1),
    ("mimo-v2.5-pro", 1, "decode", 4160, 8),
])  # fmt: skip
def test_step_kernel_compiles(model: str, tokens: int, mode: str, max_seq: int, world: int) -> None:
    from tilert.engine.persistent import precompile

    st = precompile(load_config(model), tokens, mode, max_seq, world)
    src = st.kernel.get_kernel_source()
    assert "tma_load" not in src and "globaltimer" in src
    table = st.table
    used = {OPCODES[name] for p in st.programs for name in p.opcodes} | {OPCODES["BARRIER"]}
    assert set(np.unique(table[:, :, FIELD["opcode"]])) - {0} <= used
    for name in ("ATTN_SPLIT", "MOE_GATE_UP", "LM_HEAD_GEMM", "LINEAR_FP8"):
        assert has_body(src, name), name
    # the norm scales are read inside loops that write other shared buffers: never in the merged
    # dynamic block, where a one-statement loop let the x stage overwrite them (common.alloc_unmerged)
    merged = re.findall(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem", src)
    assert merged and not [b for b in merged if b.startswith("rstd")]
    assert re.search(r"__shared__ __align__\(\d+\) float rstd\w*\[", src)
    # the expert GEMV bodies' unmerged reduction buffers are one (a CTA runs one task at a time;
    # common.alloc_unmerged(share=...)): at full scale two would put the bulk-load step past 227 KB
    reds = re.findall(r"__shared__ __align__\(\d+\) float (red\w*)\[", src)
    assert len(reds) == 1, reds
    # no cache-policy load with an odd uniform descriptor register (illegal on the H200): the
    # kernel's SASS, when nvdisasm is at hand (the dev extra installs it)
    from tilert.kernels import sass
    from tilert.kernels.common import cache_dir

    lib = sass.library_of(src, cache_dir())
    assert lib is not None  # build() caches every kernel it compiles
    if sass.find_nvdisasm():
        code = sass.disassemble(lib)
        assert "LDGSTS" in code and not sass.odd_descriptors(code)
    # weight prefetch: every fp8 linear, router and top-k task names its region, 16-byte aligned (the
    # table without the quiet rule, which leaves out the regions of tasks after expert tasks)
    assert "cp.async.bulk.prefetch.L2" in src
    with switches.applied({switches.QUIET_ENV: "none"}):
        pf = st._prefetch_table()
    ops = table[:, :, FIELD["opcode"]]
    for name in ("LINEAR_FP8", "MOE_ROUTER", "MOE_TOPK"):
        sel = ops == OPCODES[name]
        if sel.any():
            assert (pf[sel][:, 2] > 0).all() and not (pf[sel][:, [0, 1, 3]] % 16).any(), name


def test_two_rank_kernels_with_peer_collectives_compile() -> None:
    from tilert.engine.persistent import precompile

    mr = precompile(load_config("tiny-gpu"), 1, "decode", 256, 2, peers=True)
    for st in mr.ranks:
        src = st.kernel.get_kernel_source()
        assert "__threadfence_system" in src  # the peer pushes are fenced before the arrivals
        assert {name for p in st.programs for name in p.opcodes} >= {"ALL_REDUCE", "MOE_REDUCE", "ALL_GATHER"}
    assert len(mr.group._bufs) > 0  # inboxes and arrival counters shared by the two ranks
    # one kernel for every rank: rank, expert and vocabulary offsets and the peer buffers' order are
    # data (N ranks compile once), never constants in the source
    assert mr.ranks[0].kernel.get_kernel_source() == mr.ranks[1].kernel.get_kernel_source()


def test_step_rejects_unknown_kinds() -> None:
    from tilert.engine.persistent import compile_step
    from tilert.models.builder import build_step_graph
    from tilert.runtime.eager.synthetic import meta_params
    from tilert.runtime.persistent.step import PersistentError, PersistentStep

    cfg = load_config("tiny")  # head dim 24, hidden 64: off the attention and MoE bodies' contracts
    rg, sched = compile_step(build_step_graph(cfg, tokens=1, mode="decode", max_seq=64), 64)
    with pytest.raises(PersistentError, match="attention_block|MoE|contract"):
        PersistentStep(rg, sched.table, sched.counter_expected, meta_params(rg), device="meta", num_sms=132)


def test_step_kernel_with_early_loads_compiles(monkeypatch) -> None:
    # opt-in (TILERT_EARLY_LOADS=1): the GEMV and attention-split bodies issue their weight / KV
    # loads, then wait (megakernel.Gate); every body's wait is the one shared wait function
    # (tilert_wait_row with the rows in shared memory and warp 0 polling; tilert_wait_task without)
    from tilert.engine.persistent import precompile

    monkeypatch.setenv("TILERT_EARLY_LOADS", "1")
    monkeypatch.setenv(switches.WAIT_ENV, "warp")
    st = precompile(load_config("tiny-gpu"), 1, "decode", 256, 1)
    src = st.kernel.get_kernel_source()
    body = src[src.index("tilert_step_kernel(") :]
    calls = body.count("tilert_wait_row(")
    assert calls >= len({name for p in st.programs for name in p.opcodes})  # one call site per body
    assert "__noinline__ int tilert_wait_row" in src


Q_ASYNC = re.compile(r"cp_async\w*<16>\(\(&\(\(\(bfloat16_t\*\)q_s")  # a 16-byte cp.async into the q block


def test_step_kernel_with_early_attention_and_async_q_compiles(monkeypatch) -> None:
    # TILERT_EARLY_LOADS=attn: the attention splits alone run gated (KV tiles and RoPE table before the
    # wait); TILERT_ATTN_Q_LOAD=async: such a split's q rows by cp.async
    from tilert.engine.persistent import precompile
    from tilert.kernels import attention

    monkeypatch.setenv(switches.EARLY_ENV, "attn")
    monkeypatch.setenv(attention.Q_LOAD_ENV, "async")
    st = precompile(load_config("tiny-gpu"), 4, "verify", 256, 1)
    keys = [p.key for p in st.programs]
    assert any(k[0] == "attention" and k[3] is True and k[4] == "async" for k in keys)
    assert all(k[3] is False for k in keys if k[0] == "linear")
    assert st.switches[switches.EARLY_ENV] == "attn" and st.switches[attention.Q_LOAD_ENV] == "async"
    assert Q_ASYNC.search(st.kernel.get_kernel_source())  # the q block's rows by cp.async
    monkeypatch.setenv(switches.EARLY_ENV, "0")  # the async q copy of a split waited for before it runs
    st = precompile(load_config("tiny-gpu"), 4, "verify", 256, 1)
    assert any(k[0] == "attention" and k[3] is False and k[4] == "async" for k in (p.key for p in st.programs))
    assert Q_ASYNC.search(st.kernel.get_kernel_source())
    monkeypatch.setenv(switches.EARLY_ENV, "all")
    with pytest.raises(ValueError, match="TILERT_EARLY_LOADS='all'"):
        switches.early_choice()


def test_step_kernel_with_cta_waits_compiles(monkeypatch) -> None:
    # TILERT_WAIT_THREADS=cta: every body's wait is the CTA-wide one (every thread polls, a barrier
    # or-s the verdicts before the ready stamp); the warp-0 wait is neither defined nor called
    from tilert.engine.persistent import precompile

    monkeypatch.setenv(switches.WAIT_ENV, "cta")
    st = precompile(load_config("tiny-gpu"), 4, "verify", 256, 1)
    src = st.kernel.get_kernel_source()
    body = src[src.index("tilert_step_kernel(") :]
    assert "__noinline__ int tilert_wait_row_cta" in src and st.switches[switches.WAIT_ENV] == "cta"
    assert body.count("tilert_wait_row_cta(") >= len({name for p in st.programs for name in p.opcodes})
    assert "tilert_wait_row(" not in body
    for m in re.finditer(r"flags\[0\] = tilert_wait_row_cta\(", body):  # each wait: then the barrier
        assert "flags[0] = __syncthreads_or(flags[0]);" in body[m.end() : m.end() + 600]
    monkeypatch.setenv(switches.WAIT_ENV, "lanes")
    with pytest.raises(ValueError, match="TILERT_WAIT_THREADS='lanes'"):
        switches.wait_choice()


def test_step_kernel_with_probes_compiles(monkeypatch) -> None:
    # TILERT_PROBES=on: the trace gains the bodies' phase stamps; each probed body stamps its phases
    # (thread 0, into the static stamps the loop clears at a task's start and copies after its end)
    from tilert.engine.persistent import precompile
    from tilert.kernels.common import PROBE_SLOTS
    from tilert.runtime.persistent.step import trace_columns

    monkeypatch.setenv("TILERT_PROBES", "on")
    st = precompile(load_config("tiny-gpu"), 1, "decode", 256, 1)
    assert st.trace.shape[2] == trace_columns() == 3 + PROBE_SLOTS and st.switches["TILERT_PROBES"] == "on"
    src = st.kernel.get_kernel_source()
    assert "__shared__ long long tilert_probe_ts[8]" in src and "tilert_probe_clear()" in src
    for name in ("ATTN_SPLIT", "MOE_TOPK", "MOE_ROUTER", "LINEAR_FP8"):
        assert re.search(r"tilert_probe\(\d\)", moe_branch(src, name)), name
    assert src.count("= tilert_probe_read(") == 1  # one copy loop into the trace row
    monkeypatch.setenv("TILERT_PROBES", "off")  # without: no probe code at all
    off = precompile(load_config("tiny-gpu"), 1, "decode", 256, 1)
    assert "tilert_probe" not in off.kernel.get_kernel_source() and off.trace.shape[2] == 3


def test_mixed_step_kernel_compiles() -> None:
    """A mixed-sequence step (11 rows of several sequences over a pool of 5 cache slots) builds as one
    persistent kernel: its attention bodies read each row's slot, the pool is one view of every
    slot's cache rows, and no cache-policy load has an odd descriptor register."""
    from tilert.engine.persistent import precompile
    from tilert.kernels import sass
    from tilert.kernels.common import cache_dir

    st = precompile(load_config("tiny-gpu"), 11, "decode", 256, slots=5)
    src = st.kernel.get_kernel_source()
    assert "tma_load" not in src and has_body(src, "ATTN_SPLIT")
    attn = [p for p in st.programs if p.key and p.key[0] == "attention"]
    assert attn and all(p.key[1].mixed for p in attn)
    for p in attn:
        specs = dict((name, shape) for name, shape, _ in p.specs)
        assert specs["slots"] == (11,) and specs["k_cache"][0] == 5 * p.key[1].kv_heads
    lib = sass.library_of(src, cache_dir())
    assert lib is not None
    if sass.find_nvdisasm():
        assert not sass.odd_descriptors(sass.disassemble(lib))
