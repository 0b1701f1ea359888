"""The persistent chain kernel compiles for sm_90a without a GPU (CI catches broken codegen)."""

from __future__ import annotations

import pytest

from tilert.kernels.common import toolchain_reason
from tilert.plan import OPCODES
from tilert.runtime.persistent import chain
from tilert.runtime.persistent.megakernel import PERSISTENT_PASS_CONFIGS


@pytest.mark.skipif(toolchain_reason() is not None, reason=str(toolchain_reason()))
def test_persistent_chain_compiles_for_sm90a():
    from tilert.kernels.common import build

    spec = chain.ChainSpec(layers=4, m=8, n=6144)
    table, n_counters = chain.chain_table(spec)
    k = build(chain.make_kernel(spec, table.shape[1], n_counters), pass_configs=PERSISTENT_PASS_CONFIGS)
    src = k.get_kernel_source()
    # the waits: acquire loads bounded by a deadline on the GPU-wide %globaltimer (never one SM's
    # clock64: a preempted CTA may resume on another SM), in the one shared wait function
    assert "ld.acquire.gpu" in src and "deadline = tilert_globaltimer() + timeout" in src
    assert "clock64()" not in src
    assert src[src.index("__global__"):].count("tilert_wait_task(") >= 2  # a call site per body
    assert "tma_load" not in src  # producers must not run ahead of the waits
    assert "cp.async.ca" not in src
    assert f"== {OPCODES['LINEAR_MXFP4']})" in src  # dispatch generated from the plan's opcode table
