"""CPU tests of the attention kernel: every plan configuration compiles for sm_90a (no GPU
needed), and `run` rejects mismatched inputs with a message naming the mismatch."""

import pytest
import torch

from tilert.kernels import attention as A
from tilert.kernels.common import toolchain_reason


def test_configs_for_plan_cover_full_swa_and_blocks():
    cfgs = A.configs_for_plan()
    assert {(c.block, c.window) for c in cfgs} == {(1, 0), (8, 0), (1, 128), (8, 128)}
    for c in cfgs:
        assert (c.q_heads, c.kv_heads, c.head_dim, c.v_head_dim, c.rope_dim) == (16, 1, 192, 128, 64)
        assert c.sink == bool(c.window)
        assert c.smem_bytes() <= 227 * 1024


@pytest.mark.skipif(toolchain_reason() is not None, reason=f"cannot build for sm_90a: {toolchain_reason()}")
@pytest.mark.timeout(600)
def test_plan_configs_compile_for_sm90a():
    for cfg in A.configs_for_plan():
        split, combine = A.compiled(cfg)
        src = split.get_kernel_source()
        assert "wgmma" in src, f"{cfg}: QK^T / PV are not on Hopper tensor cores (no wgmma)"
        assert "tma_load" in src, f"{cfg}: key tiles are not loaded by the TMA ring"
        assert "attn_combine" in combine.get_kernel_source()


def _inputs(cfg, **over):
    x = A.make_inputs(cfg, 20, device="cpu", seed=0)
    x.update(over)
    return x


@pytest.mark.parametrize(
    "field,bad,msg",
    [
        ("q", torch.zeros(1, 16, 128, dtype=torch.bfloat16), "q has shape"),
        ("k", torch.zeros(1, 1, 192, dtype=torch.float16), "k has dtype"),
        ("positions", torch.zeros(1, dtype=torch.int64), "positions has dtype"),
        ("v_cache", torch.zeros(1, 23, 64, dtype=torch.bfloat16), "v_cache has shape"),
    ],
)
def test_run_rejects_mismatches(field, bad, msg):
    cfg = A.AttnConfig(block=1)
    x = _inputs(cfg, **{field: bad})
    with pytest.raises(ValueError, match=msg):
        A.run(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], x["sink"])


def test_run_requires_sink_iff_config_has_one():
    cfg = A.AttnConfig(block=1, window=128, sink=True)
    x = _inputs(cfg)
    with pytest.raises(ValueError, match="pass sink"):
        A.run(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], None)


def test_reference_is_the_ops_reference():
    """The kernel's reference composes tilert.ops (rope, kv_append, attention) on CPU."""
    cfg = A.AttnConfig(block=2, q_heads=4, window=8, sink=True, rope_theta=1e4)
    x = A.make_inputs(cfg, 30, device="cpu", seed=1)
    out = A.reference(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], x["sink"])
    assert out.shape == (2, 4, 128) and torch.isfinite(out).all()
    assert x["k_cache"][:, 28:30].float().abs().sum() > 0


# ---- mixed-sequence steps (several sequences' rows, each in its own cache slot) -----------------


def test_mixed_reference_is_each_sequence_alone():
    """The mixed step's reference (tilert.ops' slotted append + attention): every sequence's rows
    equal its own single-sequence reference, and other slots' caches are left alone."""
    import dataclasses

    cfg = A.AttnConfig(block=7, q_heads=4, window=8, sink=True, rope_theta=1e4, mixed=True)
    seqs = [(2, 30, 1), (0, 5, 4), (3, 11, 2)]
    x = A.make_mixed_inputs(cfg, seqs, 5, 48, device="cpu", seed=3)
    kc, vc = x["k_cache"].clone(), x["v_cache"].clone()
    out = A.reference(cfg, x["q"], x["k"], x["v"], kc, vc, x["positions"], x["sink"], slots=x["slots"])
    row = 0
    for slot, start, n in seqs:
        one = dataclasses.replace(cfg, block=n, mixed=False)
        k1, v1 = x["k_cache"][slot].clone(), x["v_cache"][slot].clone()
        rows = slice(row, row + n)
        ref = A.reference(one, x["q"][rows], x["k"][rows], x["v"][rows], k1, v1, x["positions"][rows], x["sink"])
        assert float((out[rows] - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
        assert torch.equal(kc[slot, :, : start + n], k1[:, : start + n])
        row += n
    assert kc[1].isnan().all() and kc[4].isnan().all()  # slots no row uses stay as they were


def test_mixed_config_geometry():
    cfg = A.AttnConfig(block=16, mixed=True, rows_per_cta=128)
    assert cfg.row_blocks == 16 and cfg.chunk_tokens == 8 and cfg.splits == A.WAVE_CTAS // 16
    plain = A.AttnConfig(block=16, rows_per_cta=128)
    assert plain.row_blocks == 2
    with pytest.raises(ValueError, match="multiple of group"):
        A.AttnConfig(q_heads=48, kv_heads=1, block=2, mixed=True)  # 64-row CTAs, 48 heads per kv head


def test_mixed_run_rejects_mismatches():
    cfg = A.AttnConfig(block=3, mixed=True)
    x = A.make_mixed_inputs(cfg, [(0, 4, 1), (1, 9, 2)], 3, 32, device="cpu", seed=0)
    args = (cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], x["sink"])
    with pytest.raises(ValueError, match="needs slots"):
        A.run(*args)
    with pytest.raises(ValueError, match=r"caches \[slots, Hkv, S, D\]"):
        A.run(cfg, x["q"], x["k"], x["v"], x["k_cache"][0], x["v_cache"][0], x["positions"], x["sink"],
              slots=x["slots"])  # fmt: skip
    with pytest.raises(ValueError, match="slots has dtype"):
        A.run(*args, slots=x["slots"].long())
    with pytest.raises(ValueError, match="not mixed"):
        plain = A.AttnConfig(block=3)
        y = A.make_inputs(plain, 20, device="cpu", seed=0)
        A.run(plain, y["q"], y["k"], y["v"], y["k_cache"], y["v_cache"], y["positions"], None, slots=x["slots"])


@pytest.mark.skipif(toolchain_reason() is not None, reason=f"cannot build for sm_90a: {toolchain_reason()}")
@pytest.mark.timeout(900)
def test_mixed_configs_compile_for_sm90a():
    """The mixed-sequence kernels of the mimo-v2.5-pro rank (a full layer at 8 rows, SWA layers at 16
    and at 11 rows, whose RoPE table loops once covered part of a warp) build for sm_90a; the split
    kernel takes the slots and reads the pool through its TMA descriptor."""
    odd = A.AttnConfig(block=11, window=128, sink=True, rope_theta=1e4, mixed=True)
    plan = [c for c in A.configs_for_plan(mixed=True) if c.block in (8, 16) and (c.block == 16) == bool(c.window)]
    for cfg in [*plan, odd]:
        split, combine = A.compiled(cfg)
        src = split.get_kernel_source()
        assert "wgmma" in src and "tma_load" in src and "Slot" in src, cfg
        assert "Slot" in combine.get_kernel_source()
