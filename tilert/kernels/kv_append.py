"""Cache append of rows that attend to nothing in this step: a DFlash drafter's context rows (TileLang).

One body does the `rope_kv_append` op: for each of the T new rows and each kv head, the key row is
RMS-normalised per head (optional: the drafter's k_norm, `attention.make_head_norm`), rotated
(NeoX partial RoPE at the row's own position, `attention.rope_angle`) and written to the cache at
its position; the value row is scaled (optional `v_scale`) and written beside it. Math: the
op reference (tilert/ir/opset/fused.py, composing head_rms_norm, rope, scale and kv_append).

    rope_kv_append_body(K[T, Hkv*D] bf16, V[T, Hkv*Dv] bf16, Pos[T] i32, Kn[D] bf16,
                        Kc[Hkv, S, D] bf16, Vc[Hkv, S, Dv] bf16, c)
        one task (c = 0) writes every row; Kn is read only with `norm_eps`.

A CTA of THREADS = 256 threads (the persistent kernel's), no TMA, no blockIdx. The launcher
(`make_kernel`) runs it as a grid of one CTA.
"""

import functools
from dataclasses import dataclass

import torch

from tilert.ir.registry import ref
from tilert.kernels.attention import make_head_norm, norm_cols, rope_angle
from tilert.kernels.common import alloc_unmerged, build, cdiv

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

THREADS = 256
PASS_CONFIGS = {"tl.disable_warp_specialized": True}


@dataclass(frozen=True)
class RopeKvAppendConfig:
    t: int  # new rows (tokens)
    kv_heads: int
    head_dim: int
    v_head_dim: int
    rope_dim: int
    theta: float
    v_scale: float | None = None
    norm_eps: float | None = None

    def __post_init__(self) -> None:
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim {self.rope_dim} must be even and <= head_dim {self.head_dim}")
        if self.head_dim % 16 or self.v_head_dim % 16:
            raise ValueError(f"head dims {self.head_dim}/{self.v_head_dim} are not multiples of 16")

    @property
    def rows(self) -> int:  # (token, kv head) rows
        return self.t * self.kv_heads

    @property
    def padded_rows(self) -> int:
        """Rows of the body's loops: whole warps whatever the column count (common.warp_rows' reason)."""
        return cdiv(self.rows, 32) * 32


def make_body(cfg: RopeKvAppendConfig):
    """The tile body (T.macro); see the module docstring."""
    import tilelang.language as T

    R, RP, HKV = cfg.rows, cfg.padded_rows, cfg.kv_heads
    D, DV, ROPE, RH = cfg.head_dim, cfg.v_head_dim, cfg.rope_dim, cfg.rope_dim // 2
    f32, bf16 = "float32", "bfloat16"
    norm = make_head_norm(RP, D, cfg.norm_eps) if cfg.norm_eps is not None else None

    def vrow(V, i, d):
        x = V[T.min(i, R - 1) // HKV, (i % HKV) * DV + d]
        return x if cfg.v_scale is None else T.Cast(bf16, T.Cast(f32, x) * cfg.v_scale)

    @T.macro
    def rope_kv_append_body(K, V, Pos, Kn, Kc, Vc, c):
        ks = T.alloc_shared([RP, D], bf16)
        for i, d in T.Parallel(RP, D):  # row i = (token i // Hkv, kv head i % Hkv); padding rows are zeros
            ks[i, d] = T.if_then_else(i < R, K[T.min(i, R - 1) // HKV, (i % HKV) * D + d], T.Cast(bf16, 0))
        T.sync_threads()
        if norm is not None:
            sq = T.alloc_fragment([RP, norm_cols(D)], f32)
            ss = T.alloc_fragment([RP], f32)
            rs = alloc_unmerged((RP,), f32)  # read by the loop that rewrites the rows
            norm(ks, Kn, sq, ss, rs)
        if RH:
            for i, f in T.Parallel(RP, RH):
                if i < R:
                    ang = rope_angle(Pos[i // HKV], f, ROPE, cfg.theta)
                    cs, sn = T.Cast(f32, T.cos(ang)), T.Cast(f32, T.sin(ang))
                    x0, x1 = T.Cast(f32, ks[i, f]), T.Cast(f32, ks[i, f + RH])
                    Kc[i % HKV, Pos[i // HKV], f] = T.Cast(bf16, x0 * cs - x1 * sn)
                    Kc[i % HKV, Pos[i // HKV], f + RH] = T.Cast(bf16, x1 * cs + x0 * sn)
        if D > ROPE:
            for i, d in T.Parallel(RP, D - ROPE):
                if i < R:
                    Kc[i % HKV, Pos[i // HKV], ROPE + d] = ks[i, ROPE + d]
        for i, d in T.Parallel(RP, DV):
            if i < R:
                Vc[i % HKV, Pos[i // HKV], d] = vrow(V, i, d)

    return rope_kv_append_body


def make_kernel(cfg: RopeKvAppendConfig):
    """Standalone launcher: one CTA of 256 threads; parameters K, V, Pos, Kn, Kc, Vc (S dynamic)."""
    import tilelang.language as T

    body = make_body(cfg)
    S = T.dynamic("S")
    Tn, HKV, D, DV = cfg.t, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim

    @T.prim_func
    def rope_kv_append(
        K: T.Tensor((Tn, HKV * D), "bfloat16"),
        V: T.Tensor((Tn, HKV * DV), "bfloat16"),
        Pos: T.Tensor((Tn,), "int32"),
        Kn: T.Tensor((D,), "bfloat16"),
        Kc: T.Tensor((HKV, S, D), "bfloat16"),
        Vc: T.Tensor((HKV, S, DV), "bfloat16"),
    ):
        with T.Kernel(1, threads=THREADS) as bx:
            body(K, V, Pos, Kn, Kc, Vc, bx)

    return rope_kv_append


@functools.cache
def compiled(cfg: RopeKvAppendConfig):
    return build(make_kernel(cfg), pass_configs=PASS_CONFIGS)


def reference(cfg: RopeKvAppendConfig, k, v, pos, kn, k_cache, v_cache) -> None:
    """The op reference, in place on the given caches (fp32 math, rounded once by the cache's dtype)."""
    ref("rope_kv_append")(None, k_cache, v_cache, k, v, pos, *([kn] if cfg.norm_eps is not None else []),
                          heads=cfg.kv_heads, head_dim=cfg.head_dim, rope_dim=cfg.rope_dim, theta=cfg.theta,
                          v_scale=cfg.v_scale, norm_eps=cfg.norm_eps)  # fmt: skip


def check(cfg: RopeKvAppendConfig, capacity: int = 96, seed: int | None = None) -> float:
    """Kernel vs reference on fresh random rows at random distinct positions of NaN-filled caches:
    the largest difference over the written cache rows, in bf16 ulps of the row's scale (the other
    rows must stay NaN). Raises AssertionError past one ulp."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (1 << 31))
    T_, H, D, DV = cfg.t, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    k = (torch.randn(T_, H * D, generator=g) * 3).to(torch.bfloat16)
    v = torch.randn(T_, H * DV, generator=g).to(torch.bfloat16)
    pos = torch.randperm(capacity, generator=g)[:T_].to(torch.int32)
    kn = (torch.rand(D, generator=g) + 0.5).to(torch.bfloat16)
    kc = torch.full((H, capacity, D), float("nan"), dtype=torch.bfloat16)
    vc = torch.full((H, capacity, DV), float("nan"), dtype=torch.bfloat16)
    kr, vr = kc.clone(), vc.clone()
    reference(cfg, k, v, pos, kn, kr, vr)
    dev = [x.cuda() for x in (k, v, pos, kn, kc, vc)]
    compiled(cfg)(*dev)
    torch.cuda.synchronize()
    kc, vc = dev[4].cpu(), dev[5].cpu()
    rows = pos.long()
    others = torch.ones(capacity, dtype=torch.bool)
    others[rows] = False
    assert kc[:, others].isnan().all() and vc[:, others].isnan().all(), f"{cfg}: wrote past its rows"
    err = 0.0
    for got, want in ((kc[:, rows], kr[:, rows]), (vc[:, rows], vr[:, rows])):
        ulp = want.float().abs().amax(-1, keepdim=True).clamp_min(1e-6) * 2**-7
        err = max(err, float(((got.float() - want.float()).abs() / ulp).max()))
    assert err <= 1.0, f"{cfg}: cache rows differ by {err:.3g} bf16 ulps"
    return err
