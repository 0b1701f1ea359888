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
