"""LM-head tail bodies (argmax, DFlash accept, local vocab argmax): exact ids on a Hopper GPU (skipped
without one), sm_90a compiles on CPU, and one 256-thread kernel running several bodies as tasks."""

import pytest
import torch

from tilert.kernels import common
from tilert.kernels import elementwise as ew
from tilert.kernels import lm_head_tail as lm
from tilert.kernels.lm_head_tail import Config
from tilert.ops.sampling import argmax, dflash_accept

needs_toolchain = pytest.mark.skipif(not common.has_toolchain(), reason=str(common.toolchain_reason()))
V = lm.MIMO_VOCAB


def _ids(cfgs):
    return [repr(c).replace(" ", "") for c in cfgs]


# ---- CPU: config, test data --------------------------------------------------------------------------


def test_config():
    assert Config(16, V).vec == 4 and Config(1, 1002).vec == 2 and Config(1, 1001).vec == 1
    assert Config(3, 1000, 997).n_valid == 997 and Config(3, 1000).n_valid == 1000
    with pytest.raises(ValueError):
        Config(0, 1000)
    with pytest.raises(ValueError):
        Config(1, 1000, 1001)


@pytest.mark.parametrize("cfg", [Config(8, 1000, 997), Config(16, 5000), Config(4, 1001)], ids=repr)
def test_logits_have_ties_and_padding_loses(cfg):
    x = lm.make_logits(cfg, seed=5, device="cpu")
    n = cfg.n_valid
    valid = x[:, :n]
    top = valid.max(-1, keepdim=True).values
    assert ((valid == top).sum(-1) >= 2).sum() >= cfg.t - 1  # (kind 1 may leave 1 copy at a row end)
    if n < cfg.vloc:
        assert (x[:, n:] > top).all()
    first = (valid == top).float().argmax(-1)
    assert torch.equal(argmax(valid).long(), first)  # the reference takes the lowest tied id


@pytest.mark.parametrize("a", [0, 3, 7])
def test_draft_matches_prefix(a):
    cfg = Config(8, 1000)
    post = argmax(lm.make_logits(cfg, seed=a, device="cpu"))
    out = dflash_accept(lm.make_draft(cfg, post, a, seed=a), post)
    assert int(out[0]) == a


# ---- GPU: exact ids against tilert.ops.sampling / the vocab_argmax op ------------------------------------

ARGMAX = [
    Config(1, 1000),
    Config(3, 1000, 997),  # padding columns hold larger values
    Config(4, 1001),  # vec 1
    Config(2, 1002, 1001),  # vec 2
    Config(5, 256 * 4 * 16 * 3 + 8),  # 3 full batches + a tail
    Config(1, V // 8),
    Config(16, V // 8, 19000),
    Config(8, V),
    Config(16, V),
    Config(16, V, 151000, unroll=4),
]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ARGMAX, ids=_ids(ARGMAX))
def test_argmax(cfg):
    for seed in (1, 2, 3):
        assert lm.check_argmax(cfg, seed) == 0, f"seed {seed}"


LOCAL = [Config(3, 1000, 997, offset=5000), Config(16, V // 8, 19000, offset=7 * (V // 8)), Config(8, V // 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", LOCAL, ids=_ids(LOCAL))
def test_local_argmax(cfg):
    for seed in (1, 2):
        assert lm.check_local_argmax(cfg, seed) == 0, f"seed {seed}"


ACCEPT = [Config(1, 1000), Config(3, 1000, 997), Config(8, V // 8), Config(16, V), Config(16, 1001)]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ACCEPT, ids=_ids(ACCEPT))
def test_accept(cfg):
    for a in sorted({0, cfg.t // 2, cfg.t - 1}):
        assert lm.check_accept(cfg, accepted=a, seed=a + 1) == 0, f"accepted {a}"
    for seed in (11, 12):
        assert lm.check_accept(cfg, seed=seed) == 0, f"seed {seed}"


# ---- several bodies in one 256-thread kernel (how the persistent kernel calls them) --------------------

MT, MH, MV = 3, 3000, 1000  # tokens, hidden (2 generic / 3 collective blocks), logits columns
E_CFG = ew.EmbedConfig(MT, MV, MH)
S_CFG = ew.SiluMulConfig(MT, MH)
A_CFG = ew.AddConfig(MT, MH, "float32", "bfloat16", "float32")
R_CFG = ew.AllReduceConfig(MT, MH, 4, True, "float32", "float32", "bfloat16")
L_CFG = Config(MT, MV, 997)
# (opcode, column block): embed, silu, add, all-reduce blocks, then accept
TASKS = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2), (4, 0)]


def mixed_kernel():
    """One CTA of 256 threads running a task list: `for t: if Sel[t, 0] == 0: embed ... elif ...`,
    with the column block from Sel[t, 1] and a barrier after each task (as the persistent loop)."""
    import tilelang.language as T

    embed = ew.make_body(E_CFG)
    silu = ew.make_body(S_CFG)
    add = ew.make_body(A_CFG)
    reduce_ = ew.make_body(R_CFG)
    _, accept, _, _ = lm.make_bodies(L_CFG)
    n = len(TASKS)
    bf, f32, i32 = "bfloat16", "float32", "int32"

    @T.prim_func
    def mixed(
        Sel: T.Tensor((n, 2), i32),
        Table: T.Tensor((MV, MH), bf),
        Tokens: T.Tensor((MT,), i32),
        Up: T.Tensor((MT, MH), bf),
        Res: T.Tensor((MT, MH), f32),
        X: T.Tensor((MT, MH), bf),
        Hs: T.Tensor((MT, MH), bf),
        S: T.Tensor((MT, MH), f32),
        Inbox: T.Tensor((2, MT, MH), f32),
        Y: T.Tensor((MT, MH), bf),
        Logits: T.Tensor((MT, MV), f32),
        Draft: T.Tensor((MT,), i32),
        Next: T.Tensor((MT,), i32),
        Accept: T.Tensor((MT + 1,), i32),
    ):
        with T.Kernel(1, threads=lm.THREADS) as _:
            for t in T.serial(n):
                op = Sel[t, 0]
                c = Sel[t, 1]
                if op == 0:
                    embed(Table, Tokens, X, c)
                elif op == 1:
                    silu(X, Up, Hs, c)
                elif op == 2:
                    add(Res, Hs, S, c)  # S = Res + silu(...)
                elif op == 3:
                    reduce_(S, Res, Inbox, Y, c)  # Y = bf16(Res + S)
                else:
                    accept(Logits, Draft, Next, Accept, L_CFG.n_valid)
                T.sync_threads()

    return mixed


@needs_toolchain
def test_bodies_share_one_kernel():
    src = common.build(mixed_kernel(), pass_configs=lm.PASS_CONFIGS).get_kernel_source()
    assert "__launch_bounds__(256" in src and "__shfl_xor_sync" in src
    assert "tma" not in src.lower()


PLAN = [Config(1, V), Config(8, V // 8), Config(16, V // 8, 19000)]


@needs_toolchain
@pytest.mark.parametrize("cfg", PLAN, ids=_ids(PLAN))
def test_compile_sm90(cfg):
    for which in lm.KERNELS:
        src = lm.compiled(cfg, which).get_kernel_source()
        assert "__launch_bounds__(256" in src and "float4" in src and "__shfl_xor_sync" in src
        assert "tma" not in src.lower() and "blockIdx" not in src


@pytest.mark.gpu
def test_bodies_share_one_kernel_gpu():
    k = common.build(mixed_kernel(), pass_configs=lm.PASS_CONFIGS)
    g = torch.Generator(device="cuda").manual_seed(7)
    dev = "cuda"

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, device=dev, generator=g).to(dt)

    def nan(*shape, dt=torch.float32):
        return torch.full(shape, float("nan"), device=dev, dtype=dt)

    sel = torch.tensor(TASKS, dtype=torch.int32, device=dev)
    table, up, res = rnd(MV, MH, dt=torch.bfloat16), rnd(MT, MH, dt=torch.bfloat16), rnd(MT, MH)
    tokens = torch.tensor([MV - 1, 0, 17], dtype=torch.int32, device=dev)
    x, hs, y = (nan(MT, MH, dt=torch.bfloat16) for _ in range(3))
    s, inbox = nan(MT, MH), nan(2, MT, MH)
    logits = lm.make_logits(L_CFG, seed=3)
    post = argmax(logits[:, : L_CFG.n_valid])
    draft = lm.make_draft(L_CFG, post, 1, seed=3)
    nxt = torch.full((MT,), -7, dtype=torch.int32, device=dev)
    acc = torch.full((MT + 1,), -7, dtype=torch.int32, device=dev)
    k(sel, table, tokens, up, res, x, hs, s, inbox, y, logits, draft, nxt, acc)
    torch.cuda.synchronize()
    rx = ew.reference(E_CFG, table, tokens).to(torch.bfloat16)
    rh = ew.reference(S_CFG, rx, up).to(torch.bfloat16)
    rs = ew.reference(A_CFG, res, rh)
    ry = ew.reference(R_CFG, rs, res).to(torch.bfloat16)
    assert torch.equal(x, rx)
    assert (hs.float() - rh.float()).abs().max() <= 1e-2 * rh.float().abs().max()
    torch.testing.assert_close(s, res + hs.float(), rtol=0, atol=0)
    torch.testing.assert_close(y, (res + s).to(torch.bfloat16), rtol=0, atol=0)
    assert (y.float() - ry.float()).abs().max() <= 1e-2 * ry.float().abs().max()
    assert torch.equal(nxt, post)
    assert torch.equal(acc, dflash_accept(draft, post))
