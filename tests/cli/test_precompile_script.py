"""scripts/precompile_gpu.py's cache housekeeping (the compiles themselves run in the kernel tests)."""

from __future__ import annotations

import importlib.util
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("precompile_gpu", ROOT / "scripts" / "precompile_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cache(tmp: Path) -> Path:
    cache = tmp / "next"
    for rel in ("0.1.15/linux-x86_64/kernels/abc/device_kernel.cu", "0.1.15/linux-x86_64/.staging/x.cubin",
                "0.1.14/cuda-binaries/y.cubin", "0.1.15/linux-x86_64/kernels/abc/executable.so"):  # fmt: skip
        f = cache / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(rel * 50)
    return cache


def test_prune_finds_the_cubin_caches_at_any_depth_and_nothing_else(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    found = _script().prunable(cache)
    assert found == sorted([cache / "0.1.14/cuda-binaries", cache / "0.1.15/linux-x86_64/.staging"])


def test_prune_skips_caches_inside_another(tmp_path: Path) -> None:
    # TileLang 0.1.15 keeps cuda-binaries under .staging: removing .staging removes both
    cache = _cache(tmp_path)
    (cache / "0.1.15/linux-x86_64/.staging/cuda-binaries").mkdir()
    assert _script().prunable(cache) == sorted([cache / "0.1.14/cuda-binaries", cache / "0.1.15/linux-x86_64/.staging"])


def test_pack_round_trips_the_kernels(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    out = _script().pack(cache, tmp_path / "out" / "next.tar.xz")
    assert out.stat().st_size < sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    with tarfile.open(out) as tf:
        tf.extractall(tmp_path / "unpacked", filter="data")
    src = cache / "0.1.15/linux-x86_64/kernels/abc/device_kernel.cu"
    back = tmp_path / "unpacked" / "kernels" / "0.1.15/linux-x86_64/kernels/abc/device_kernel.cu"
    assert back.read_text() == src.read_text()


def test_an_unpacked_pack_is_the_cache_where_the_cache_variable_points_at_its_folder(tmp_path, monkeypatch) -> None:
    # `tar -C DIR -xJf pack` with TILERT_KERNEL_CACHE=DIR: the kernels are found (a miss compiles
    # every kernel again, minutes for a full-scale step)
    from tilert.kernels import common

    cache = _cache(tmp_path)
    _script().pack(cache, tmp_path / "p.tar.xz")
    with tarfile.open(tmp_path / "p.tar.xz") as tf:
        tf.extractall(tmp_path / "gpu", filter="data")
    for where in (tmp_path / "gpu", tmp_path / "gpu" / "kernels"):
        monkeypatch.setenv("TILERT_KERNEL_CACHE", str(where))
        assert common.cache_dir() == tmp_path / "gpu" / "kernels"
    monkeypatch.setenv("TILERT_KERNEL_CACHE", str(cache))  # a cache itself is left as it is
    assert common.cache_dir() == cache
