"""A kernel that fails to compile reaches the user as one line naming the kernel and the compiler's
own message (KernelCompileError, a ValueError: the CLI prints it and exits with code 2)."""

from __future__ import annotations

import pytest

from tilert.kernels import common

TVM_STACK = """Traceback (most recent call last):
  File "<unknown>", line 0, in tvm::tl::TileLangThreadSync(tvm::tirx::PrimFunc)
  File "<unknown>", line 0, in tvm::runtime::detail::LogFatal::~LogFatal()
tvm.error.InternalError: [ThreadSync] Cannot lower a required shared-memory sync inside the then branch"""


def test_build_turns_a_compiler_stack_into_one_line(monkeypatch) -> None:
    tilelang = pytest.importorskip("tilelang")

    def fail(*a, **kw):
        raise RuntimeError(TVM_STACK)

    monkeypatch.setattr(tilelang, "compile", fail)
    with pytest.raises(common.KernelCompileError) as e:
        common.build(object(), what="persistent step of 'tiny-gpu.decode.B3'")
    msg = str(e.value)
    assert "\n" not in msg and "tiny-gpu.decode.B3" in msg and "[ThreadSync] Cannot lower" in msg
    assert isinstance(e.value, ValueError)


def test_cli_prints_a_compile_error_as_one_line(monkeypatch, capsys) -> None:
    from tilert import cli

    def fail(args):
        raise common.KernelCompileError("kernel attn failed to compile: [ThreadSync] Cannot lower ...")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["generate"].set_defaults(fn=fail)
    assert cli.main(["generate", "--prompt-ids", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: kernel attn failed to compile")


def test_cli_prints_a_failed_gpu_step_as_one_line(monkeypatch, capsys) -> None:
    from tilert import cli
    from tilert.runtime.persistent.megakernel import PersistentError, raise_on_error

    def fail(args):
        raise_on_error([1, 3, 7, 42])  # a timed-out wait: sm 3, task slot 7, counter 42

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["generate"].set_defaults(fn=fail)
    assert cli.main(["generate", "--prompt-ids", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sm 3, task slot 7, counter 42" in err
    with pytest.raises(PersistentError):
        raise_on_error([1, 3, 7, 42])


def _smem_kernel(dyn_floats: int, static_floats: int):
    """A kernel with `dyn_floats` floats of dynamic and `static_floats` of static shared memory,
    every byte of both used (so neither is folded away)."""
    import tilelang.language as T

    @T.prim_func
    def smem_probe(A: T.Tensor((256,), "float32")):
        with T.Kernel(1, threads=256):
            d = T.alloc_shared((dyn_floats,), "float32")
            s = T.alloc_shared((static_floats,), "float32", scope="shared")
            for i in T.serial(dyn_floats // 256):
                for t in T.Parallel(256):
                    d[i * 256 + t] = A[t] + i
            for i in T.serial(static_floats // 256):
                for t in T.Parallel(256):
                    s[i * 256 + t] = d[i * 256 + t] * 2
            for t in T.Parallel(256):
                A[t] = s[t] + d[dyn_floats - 256 + t]

    return smem_probe


@pytest.mark.skipif(not common.has_toolchain(), reason="needs tilelang and nvcc")
def test_build_refuses_a_kernel_past_the_shared_memory_of_one_sm(tmp_path, monkeypatch) -> None:
    """Static + dynamic shared memory is checked at build time, from the compiled library (also on
    a cache hit), not first discovered as a launch failure on the GPU."""
    monkeypatch.setenv("TILERT_KERNEL_CACHE", str(tmp_path))
    fits = common.build(_smem_kernel(40 * 1024, 8 * 1024))  # 160 KB + 32 KB
    (fn, (static, dynamic)), = common.shared_memory_bytes(fits).items()
    assert 32 * 1024 <= static < 34 * 1024 and dynamic == 160 * 1024, (fn, static, dynamic)
    res = common.kernel_resources(fits)[fn]  # registers per thread from the cubin's .nv.info
    assert 0 < res["registers"] <= 255 and (res["static_smem"], res["dynamic_smem"]) == (static, dynamic)
    too_big = 50 * 1024, 8 * 1024  # 200 KB dynamic fits alone, not with 32 KB static
    for _ in range(2):  # a fresh compile, then the disk cache's entry
        with pytest.raises(common.KernelCompileError) as e:
            common.build(_smem_kernel(*too_big), what="smem probe")
        msg = str(e.value)
        assert "smem probe" in msg and "does not fit one SM" in msg and f"{200 * 1024} dynamic" in msg
        from tilelang import cache

        for c in cache._dispatch_map.values():  # the next build loads the library from disk
            c._memory_cache.clear()
