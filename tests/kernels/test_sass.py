"""tilert.kernels.sass: the cubin carved out of a kernel library, and the odd-descriptor check."""

import struct

import pytest

from tilert.kernels import sass


def _elf(payload: bytes) -> bytes:
    # a 64-bit EM_CUDA ELF header whose section table ends the image: e_shoff + e_shentsize * e_shnum
    h = bytearray(64)
    h[0:4], h[4] = b"\x7fELF", 2
    struct.pack_into("<H", h, 18, 190)
    struct.pack_into("<QQ", h, 0x20, 64, 64 + len(payload))  # e_phoff, e_shoff
    struct.pack_into("<HHHH", h, 0x36, 56, 0, 64, 1)  # e_phentsize, e_phnum, e_shentsize, e_shnum
    return bytes(h) + payload + bytes(64)


def test_carve_cubin_takes_the_cuda_elf_only(tmp_path):
    cubin = _elf(b"SASS" * 8)
    host = b"\x7fELF" + bytes(60)  # the library's own (host) ELF header: class 0, not EM_CUDA
    lib = tmp_path / "executable.so"
    lib.write_bytes(host + b"junk" + cubin + b"tail")
    sass.carve_cubin(lib, tmp_path / "k.cubin")
    assert (tmp_path / "k.cubin").read_bytes() == cubin
    lib.write_bytes(host + b"no device code")
    with pytest.raises(ValueError, match="no embedded CUDA ELF"):
        sass.carve_cubin(lib, tmp_path / "k.cubin")


def test_odd_descriptors():
    code = """
        /*0310*/                   LDGSTS.E.BYPASS.128 [R25], desc[UR8][R10.64], P0 ;
        /*32e0*/                   LDGSTS.E.BYPASS.128 [R25+UR0], desc[UR1][R12.64], P0 ;
        /*0710*/                   LD.E.128 R28, desc[UR10][R10.64] ;
        /*0720*/                   LD.E.128 R28, desc[UR13][R10.64] ;
    """
    assert [s.split()[0] for s in sass.odd_descriptors(code)] == ["/*32e0*/", "/*0720*/"]


def test_library_of_matches_the_source(tmp_path):
    d = tmp_path / "0.1.15" / "linux-x86_64" / "kernels" / "abc"
    d.mkdir(parents=True)
    (d / "device_kernel.cu").write_text("kernel A")
    (d / "executable.so").write_bytes(b"")
    assert sass.library_of("kernel A", tmp_path) == d / "executable.so"
    assert sass.library_of("kernel B", tmp_path) is None
