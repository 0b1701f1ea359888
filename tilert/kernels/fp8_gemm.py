"""FP8 e4m3 weight (128x128 block scales) x bf16 activation GEMM: y[M, N] (f32) = x @ W^T.

W: q float8_e4m3fn [N, K], scale_inv f32 [ceil(N/128), ceil(K/128)] (tilert.numerics.fp8).

Body `fp8_tile(X, Q, Sinv, Y, n_tile, m_tile, k_split)` (swap AB like the MXFP4 kernel):
  tile       block_n weight rows x block_m tokens; block_n and block_k divide 128, so one scale
             covers a whole (n, k) tile; K / (block_k * split_k) k tiles per call.
  pipeline   q [block_n, block_k] fp8 and x [block_m, block_k] bf16 go global -> shared
             (`stages`-deep, TMA/cp.async); the fp8 tile is converted to bf16 and multiplied by its
             block scale in registers, stored to one bf16 shared tile, then a bf16 MMA with fp32
             accumulators [block_n, block_m].
  shared     stages * (block_n*block_k + 2*block_m*block_k) + 2*block_n*block_k bytes
  threads    `threads` (256 for block_n = 128, 128 for block_n = 64)
  writes     Y[m_tile*block_m : +block_m, n_tile*block_n : +block_n] (clipped to N), for its k range
             (fp32 atomics when split_k > 1, Y pre-zeroed).
"""

import functools
from dataclasses import dataclass

import torch

from tilert.kernels import gemv
from tilert.kernels.common import build, cdiv, launch_decode_gemm
from tilert.ops.linear import fp8_linear

reference = fp8_linear


@dataclass(frozen=True)
class Config:
    m: int
    n: int
    k: int
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    stages: int = 4
    threads: int = 256


def pick_config(m: int, n: int, k: int, sms: int = 132) -> Config:
    block_m = min(64, max(16, cdiv(m, 16) * 16))
    block_k = next(b for b in (128, 64, 32) if k % b == 0)
    block_n = 128 if n >= 128 * 16 else 64
    threads = 256 if block_n == 128 else 128
    tiles = cdiv(n, block_n) * cdiv(m, block_m)
    nk = k // block_k
    split_k = 1
    for s in range(2, nk + 1):
        if nk % s == 0 and nk // s >= 2 and tiles * s <= sms * 1.2:
            split_k = s
    return Config(cdiv(m, block_m) * block_m, n, k, block_m, block_n, block_k, split_k, 4, threads)


def make_body(cfg: Config):
    """The tile body as a T.macro of (X, Q, Sinv, Y, n_tile, m_tile, k_split)."""
    import tilelang.language as T

    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    nk = cfg.k // bk // cfg.split_k

    @T.macro
    def fp8_tile(X, Q, Sinv, Y, n_tile, m_tile, k_split):
        x_s = T.alloc_shared((bm, bk), "bfloat16")
        q_s = T.alloc_shared((bn, bk), "float8_e4m3")
        wd_s = T.alloc_shared((bn, bk), "bfloat16")
        acc = T.alloc_fragment((bn, bm), "float32")
        T.clear(acc)
        for kk in T.Pipelined(nk, num_stages=cfg.stages):
            k0 = (k_split * nk + kk) * bk
            T.copy(Q[n_tile * bn, k0], q_s)
            T.copy(X[m_tile * bm, k0], x_s)
            sc = Sinv[n_tile * bn // 128, k0 // 128]
            for i, j in T.Parallel(bn, bk):
                wd_s[i, j] = T.cast(T.cast(q_s[i, j], "float32") * sc, "bfloat16")
            T.gemm(wd_s, x_s, acc, transpose_B=True)
        for i, j in T.Parallel(bn, bm):
            if n_tile * bn + i < cfg.n:
                if cfg.split_k == 1:
                    Y[m_tile * bm + j, n_tile * bn + i] = acc[i, j]
                else:
                    T.atomic_add(Y[m_tile * bm + j, n_tile * bn + i], acc[i, j])

    return fp8_tile


def make_kernel(cfg: Config):
    import tilelang.language as T

    body = make_body(cfg)
    M, N, K = cfg.m, cfg.n, cfg.k

    @T.prim_func
    def fp8_gemm(
        X: T.Tensor((M, K), "bfloat16"),
        Q: T.Tensor((N, K), "float8_e4m3"),
        Sinv: T.Tensor((cdiv(N, 128), cdiv(K, 128)), "float32"),
        Y: T.Tensor((M, N), "float32"),
    ):
        with T.Kernel(cdiv(N, cfg.block_n), (M // cfg.block_m) * cfg.split_k, threads=cfg.threads) as (bx, by):
            body(X, Q, Sinv, Y, bx, by // cfg.split_k, by % cfg.split_k)

    return fp8_gemm


@functools.cache
def compiled(cfg: Config | gemv.Config):
    return gemv.compiled(cfg) if isinstance(cfg, gemv.Config) else build(make_kernel(cfg))


def _check_inputs(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or q.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"expected 2-D x, q, scale_inv; got {x.dim()}-D, {q.dim()}-D, {scale_inv.dim()}-D")
    m, k = x.shape
    n = q.shape[0]
    if k % 32:
        raise ValueError(f"K = {k} must be a multiple of 32")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"x must be bfloat16, got {x.dtype}")
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"q must be float8_e4m3fn, got {q.dtype}")
    if scale_inv.dtype != torch.float32:
        raise TypeError(f"scale_inv must be float32, got {scale_inv.dtype}")
    if q.shape[1] != k:
        raise ValueError(f"q shape {tuple(q.shape)} has K = {q.shape[1]}, x has K = {k}")
    if tuple(scale_inv.shape) != (cdiv(n, 128), cdiv(k, 128)):
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} != ({cdiv(n, 128)}, {cdiv(k, 128)})")
    if not (x.is_cuda and q.is_cuda and scale_inv.is_cuda):
        raise ValueError("x, q and scale_inv must be CUDA tensors")
    return m, n, k


def eager_config(m: int, n: int, k: int) -> Config | gemv.Config:
    """The kernel `run` launches for this shape: the streaming GEMV (kernels/gemv.py) for
    M <= gemv.MAX_M when it is enabled (`gemv.enabled()`), else this file's GEMM."""
    return gemv.pick_config("fp8", m, n, k) if m <= gemv.MAX_M and gemv.enabled() else pick_config(m, n, k)


def run(
    x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, cfg: Config | gemv.Config | None = None
) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] bf16 @ (q * block scale_inv)^T: the streaming GEMV for M <= 16
    (operands it supports) when `gemv.enabled()`, else this file's GEMM; `cfg` forces either."""
    m, n, k = _check_inputs(x, q, scale_inv)
    if isinstance(cfg, gemv.Config) or (cfg is None and gemv.enabled() and gemv.supports("fp8", x, q, scale_inv)):
        return gemv.run("fp8", x, q, scale_inv, cfg)
    cfg = cfg or pick_config(m, n, k)
    return launch_decode_gemm(compiled(cfg), x, q, scale_inv, cfg.m, n, cfg.split_k)


def check(m: int, n: int, k: int, seed: int | None = None, cfg: Config | None = None) -> float:
    """Fresh random data, NaN-poisoned output when not split; returns ||y - ref|| / ||ref||."""
    from tilert.numerics import fp8

    g = torch.Generator(device="cuda")
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
    q, s = fp8.quantize_blocks(w)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    cfg = cfg or pick_config(m, n, k)
    if cfg.split_k == 1:
        y = torch.full((cfg.m, n), float("nan"), device="cuda")
        xp = torch.zeros(cfg.m, k, dtype=x.dtype, device="cuda")
        xp[:m] = x
        compiled(cfg)(xp, q, s, y)
        y = y[:m]
    else:
        y = run(x, q, s, cfg)
    if not torch.isfinite(y).all():
        raise AssertionError(f"output has unwritten/non-finite elements (M={m}, N={n}, K={k}, {cfg})")
    ref = reference(x, q, s).double()
    return ((y.double() - ref).norm() / ref.norm()).item()


# mimo-v2.5-pro dense projections: per rank of 8 and unsharded (N, K).
MIMO_SHAPES = {
    "q_proj/8": (3072, 6144),
    "k_proj/8": (192, 6144),
    "v_proj/8": (128, 6144),
    "o_proj/8": (6144, 2048),
    "mlp_gate_up/8": (4096, 6144),
    "mlp_down/8": (6144, 2048),
    "q_proj": (24576, 6144),
    "o_proj": (6144, 16384),
    "mlp_gate_up": (32768, 6144),
    "mlp_down": (6144, 16384),
}
PLAN_SHAPES = ("q_proj/8", "k_proj/8", "v_proj/8", "o_proj/8", "mlp_gate_up/8", "mlp_down/8")
DECODE_M = (1, 2, 4, 8, 16, 32, 64)


def configs_for_plan(ms: tuple[int, ...] = DECODE_M, names: tuple[str, ...] = PLAN_SHAPES) -> list[Config]:
    """Deduplicated configs of this file's GEMM the 8-rank mimo-v2.5-pro plan compiles (M <= 16
    runs the streaming GEMV instead when it is enabled: gemv.configs_for_plan)."""
    ms = [m for m in ms if m > gemv.MAX_M or not gemv.enabled()]
    return sorted({pick_config(m, *MIMO_SHAPES[nm]) for m in ms for nm in names}, key=repr)
