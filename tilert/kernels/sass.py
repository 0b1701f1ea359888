"""A compiled kernel's SASS, without a GPU: carve the sm_90a cubin out of TileLang's kernel library,
disassemble it (nvdisasm from CUDA_HOME, PATH or the nvidia-cuda-nvdisasm wheel), and check it for
code the H200 rejects at run time.

The check: a global access with an L2 cache policy (`LDGSTS ... desc[URn]`, `LD.E ... desc[URn]`)
reads its 64-bit descriptor from the uniform register pair URn:URn+1. ptxas (CUDA 13.0) can start
that pair at an odd register (desc[UR1]), and the H200 raises "illegal instruction" at such an
access (compute-sanitizer, docs/performance.md); every even-started descriptor has run. CI
compiles the step kernels and fails on an odd one.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sysconfig
from pathlib import Path

_ODD_DESC = re.compile(r"desc\[UR(\d*[13579])\]")


def carve_cubin(lib: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write the sm_90a cubin embedded in a TileLang kernel library (an ELF inside the .so: the
    kernel's SASS and its line table, which nvdisasm -g reads)."""
    Path(out).write_bytes(_cubin_bytes(lib))


def _cubin_bytes(lib: str | os.PathLike) -> bytes:
    """The sm_90a cubin embedded in a kernel library, as bytes."""
    b = Path(lib).read_bytes()
    i = 0
    while (i := b.find(b"\x7fELF", i + 1)) > 0:
        if b[i + 4] == 2 and struct.unpack_from("<H", b, i + 18)[0] == 190:  # 64-bit, EM_CUDA
            phoff, shoff = struct.unpack_from("<QQ", b, i + 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", b, i + 0x36)
            return b[i : i + max(shoff + shentsize * shnum, phoff + phentsize * phnum)]
    raise ValueError(f"{lib}: no embedded CUDA ELF")


def _sections(elf: bytes) -> list[tuple[str, tuple[int, ...]]]:
    """[(name, (sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info))] of an
    ELF64, in header order (sh_link indexes this list)."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQII", elf, shoff + j * shentsize) for j in range(shnum)]
    names = headers[shstrndx][4]  # sh_offset of the section-name table
    return [(_cstr(elf, names + h[0]), h) for h in headers]


def _cstr(elf: bytes, start: int) -> str:
    return elf[start : elf.index(b"\0", start)].decode()


def static_shared_bytes(lib: str | os.PathLike, kernel: str) -> int:
    """Static shared memory of `kernel` in a kernel library: the size of its cubin's
    `.nv.shared.<kernel>` section (the `__shared__` arrays the dynamic buffer does not hold; the
    driver adds it to the dynamic size at launch)."""
    return sum(h[5] for name, h in _sections(_cubin_bytes(lib)) if name == f".nv.shared.{kernel}")


_EIATTR_REGCOUNT = 0x2F  # .nv.info attribute: (symbol index, registers per thread)


def register_count(lib: str | os.PathLike, kernel: str) -> int | None:
    """Registers per thread ptxas gave `kernel` in a kernel library (the cubin's .nv.info
    REGCOUNT of the kernel's symbol), None if the cubin does not say. Registers x threads bounds
    the CTAs an SM holds as shared memory does (65536 registers an SM)."""
    elf = _cubin_bytes(lib)
    secs = _sections(elf)
    info = next((h for name, h in secs if name == ".nv.info"), None)
    symtab = next((h for name, h in secs if name == ".symtab"), None)
    if info is None or symtab is None:
        return None
    strtab = secs[symtab[6]][1]  # sh_link: the symbol names' table
    syms = {j: _cstr(elf, strtab[4] + struct.unpack_from("<I", elf, symtab[4] + 24 * j)[0])
            for j in range(symtab[5] // 24)}  # ELF64 symbols are 24 bytes, st_name first  # fmt: skip
    off, end = info[4], info[4] + info[5]
    while off < end:  # entries: format byte, attribute byte, then a 16-bit value or a sized payload
        fmt, attr = elf[off], elf[off + 1]
        if fmt == 0x04:  # EIFMT_SVAL: a 16-bit size, then the payload
            size = struct.unpack_from("<H", elf, off + 2)[0]
            if attr == _EIATTR_REGCOUNT and size >= 8:
                sym, regs = struct.unpack_from("<II", elf, off + 4)
                if syms.get(sym) == kernel:
                    return regs
            off += 4 + size
        else:  # EIFMT_NVAL (no value), EIFMT_HVAL (16-bit value)
            off += 2 if fmt == 0x01 else 4
    return None


def find_nvdisasm() -> str | None:
    """nvdisasm from CUDA_HOME, PATH, or the nvidia-cuda-nvdisasm wheel (the dev extra), else None."""
    home = os.environ.get("CUDA_HOME")
    cands = [Path(home, "bin", "nvdisasm")] if home else []
    on_path = shutil.which("nvdisasm")
    cands += [Path(on_path)] if on_path else []
    site = Path(sysconfig.get_paths()["purelib"], "nvidia")
    cands += sorted(site.glob("cu*/bin/nvdisasm")) + sorted(site.glob("cuda_nvdisasm/bin/nvdisasm"))
    return next((str(c) for c in cands if c.is_file() and os.access(c, os.X_OK)), None)


def disassemble(lib: str | os.PathLike, line_info: bool = False) -> str:
    """The SASS text of a kernel library's cubin (`nvdisasm -c`, with -gi: inlined line info)."""
    tool = find_nvdisasm()
    if tool is None:
        raise FileNotFoundError("nvdisasm not found (CUDA_HOME/bin, PATH or pip install nvidia-cuda-nvdisasm)")
    cubin = Path(str(lib) + ".cubin")
    carve_cubin(lib, cubin)
    try:
        args = [tool, "-c", *(["-gi"] if line_info else []), str(cubin)]
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout
    finally:
        cubin.unlink(missing_ok=True)


def odd_descriptors(sass: str) -> list[str]:
    """The instructions that read a cache-policy descriptor from an odd uniform register."""
    return [s.strip() for s in sass.splitlines() if _ODD_DESC.search(s)]


def library_of(source: str, cache: str | os.PathLike) -> Path | None:
    """The cached kernel library (executable.so) whose device source is `source`, if any."""
    for cu in Path(cache).glob("*/*/kernels/*/device_kernel.cu"):
        if cu.read_text() == source:
            lib = cu.with_name("executable.so")
            return lib if lib.exists() else None
    return None
