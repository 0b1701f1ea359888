"""Shared helpers for tile kernels: the Hopper target, a disk-cached `build`, capability checks.

Importing this module does not import tilelang; `build` does, on first use.

API (stable; other kernel files import it):
    HOPPER_TARGET            {"kind": "cuda", "arch": "sm_90a"} (a bare "cuda" falls back to sm_50)
    cache_dir()              Path of the kernel disk cache (env TILERT_KERNEL_CACHE,
                             default ~/.cache/tilert/kernels)
    build(func, *, out_idx=None, target=HOPPER_TARGET, pass_configs=None, compile_flags=None,
          out_dir=None, name=None, what=None) -> tilelang JITKernel
                             compile a TileLang prim_func (memory + disk cached); with out_dir,
                             also write the generated CUDA source to out_dir/<name>.cu; a failure
                             raises KernelCompileError (a ValueError: one line, CLI exit code 2),
                             and so does a kernel whose shared memory (static + dynamic) is past
                             CTA_SMEM_LIMIT
    shared_memory_bytes(kernel)           {device function: (static, dynamic)} bytes of shared memory
    kernel_resources(kernel)              {device function: registers per thread, static and dynamic shared memory}
    CTA_SMEM_LIMIT           shared memory one CTA may take on H100/H200 (227 KB)
    warp_rows(rows, cols, limit)          pad a T.Parallel loop's rows to whole warps
    hopper_reason() / has_hopper()        None/True when a Hopper (sm_90) GPU is usable
    toolchain_reason() / has_toolchain()  None/True when tilelang and nvcc can build for sm_90a
    cdiv(a, b)               ceiling division
    DEVICE_PRELUDE           the ONE device-helper source every kernel imports (T.import_source):
                             a persistent kernel accepts a single import string, so all bodies
                             share this one (value-in/value-out helpers only: no addresses)
    prelude() / using_prelude(src)   the prelude bodies import: DEVICE_PRELUDE, or a superset of it
                             while a step kernel whose bodies need more helpers is built
    probing() / using_probes() / make_probe()   phase stamps inside a step kernel's bodies
                             (TILERT_PROBES=on): PROBE_SLOTS stamps a task, PROBE_PRELUDE
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

HOPPER_TARGET: dict[str, str] = {"kind": "cuda", "arch": "sm_90a"}
DEFAULT_CACHE = "~/.cache/tilert/kernels"
CTA_SMEM_LIMIT = 227 * 1024  # shared memory one CTA may take (H100, H200: the SM's 228 KB less 1 KB the CTA reserves)
RESOURCES_FILE = "tilert-resources.json"  # beside a cached kernel library: its device functions' dynamic shared memory

# E2M1 pair -> bf16x2: byte `sel` picks byte b of w (low nibble -> lane 0) and byte b of u = w >> 4
# (high nibble -> lane 1); code (s e1 e0 m) placed as bf16 bits s<<15 | (e1 e0 m)<<6 is the true
# value * 2^-126 (e = 0 lands on bf16 subnormals, which bf16x2 fma keeps); one bf16x2 multiply by
# `mult` = 2^(scale-1) (both lanes) restores value * 2^(scale-127) exactly.
# E4M3 pair -> bf16x2: `sel` moves two bytes of w into the high bytes of the two halves (0x1404:
# bytes 0, 1; 0x3424: bytes 2, 3); sign stays at bit 15, exponent+mantissa shift to bits 10..4, so the
# bf16 reads as value * 2^-120 (e = 0 on bf16 subnormals); one bf16x2 multiply by 2^120 is exact.
DEVICE_PRELUDE = r"""
#ifndef TILERT_DEVICE_PRELUDE
#define TILERT_DEVICE_PRELUDE
__device__ __forceinline__ unsigned tilert_bf16x2_mul(unsigned a, unsigned b) {
  unsigned d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}
__device__ __forceinline__ unsigned tilert_e2m1x2(unsigned w, unsigned u, unsigned sel, unsigned mult) {
  const unsigned y = __byte_perm(w, u, sel);
  return tilert_bf16x2_mul(((y << 6) & 0x01C001C0u) | ((y << 12) & 0x80008000u), mult);
}
__device__ __forceinline__ unsigned tilert_e2m1x2_ord(unsigned w, int b, unsigned mult) {
  // E2M1 pair of (published) byte b of a word in decode order (numerics/mxfp4.py): one funnel shift
  // or carry-free multiply (b constant: the branches fold) and one mask give the codes placed as
  // tilert_e2m1x2 places them (value * 2^-126); the multiply by mult = 2^(scale-1) restores them
  const unsigned y = b == 0 ? w : b == 1 ? __funnelshift_l(w, w, 10) : b == 2 ? __funnelshift_l(w, w, 13)
                                                                      : (w & 0x001B001Bu) * 0x1084u;
  return tilert_bf16x2_mul(y & 0x81C081C0u, mult);
}
__device__ __forceinline__ unsigned tilert_e4m3x2(unsigned w, unsigned sel) {
  const unsigned v = __byte_perm(w, 0u, sel);
  return tilert_bf16x2_mul((v & 0x80008000u) | ((v >> 4) & 0x07F007F0u), 0x7B807B80u);
}
__device__ __forceinline__ void tilert_prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(p));
}
__device__ __forceinline__ void tilert_prefetch_bulk_l2(long long addr, int bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" : : "l"(addr), "r"(bytes) : "memory");
}
__device__ __forceinline__ unsigned tilert_ballot(int p) { return __ballot_sync(0xffffffffu, p != 0); }
__device__ __forceinline__ int tilert_popc(unsigned m) { return __popc(m); }
__device__ __forceinline__ int tilert_popc_below(unsigned m, int lane) { return __popc(m & ((1u << lane) - 1u)); }
__device__ __forceinline__ void tilert_cp_async16_ef(void* smem, int soff, const void* gmem, long long goff,
                                                     bool ok) {
  // 16 bytes global -> shared (u32 offsets from each base; zero-filled when !ok), marked evict-first
  // in L2: streamed weights are read once per step, so they should not push the kernel's code and
  // activations out of L2
  unsigned long long pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  // src-size is a runtime value (`gmem` is never null), so ptxas emits the predicated zero-fill
  // LDGSTS, the form the persistent step runs on the H200. (A standalone GEMV's "illegal
  // instruction" here was an odd policy-descriptor register, not this form: tilert_cp_async16.)
  const unsigned s = (unsigned)__cvta_generic_to_shared((unsigned*)smem + soff);
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;"
               : : "r"(s), "l"((const unsigned*)gmem + goff), "r"(ok && gmem != nullptr ? 16 : 0), "l"(pol)
               : "memory");
}
__device__ __forceinline__ void tilert_cp_async16(void* smem, int soff, const void* gmem, long long goff, bool ok) {
  // as tilert_cp_async16_ef without the L2 policy, for standalone launches: in one standalone GEMV
  // (m=1, 3072 x 6144) ptxas put the policy descriptor of the loop's LDGSTS in an odd uniform
  // register (desc[UR1]), which the H200 rejects as an illegal instruction (compute-sanitizer)
  const unsigned s = (unsigned)__cvta_generic_to_shared((unsigned*)smem + soff);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               : : "r"(s), "l"((const unsigned*)gmem + goff), "r"(ok && gmem != nullptr ? 16 : 0) : "memory");
}
__device__ __forceinline__ void tilert_ld16_ef(void* dst, int doff, const void* gmem, long long goff) {
  // 16 bytes global -> registers (dst: a local u32 array, doff a constant after unrolling), L2
  // evict-first, no L1 allocation: as tilert_cp_async16_ef, for weights loaded into registers
  unsigned long long pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  uint4 v;
  asm volatile("ld.global.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"((const unsigned*)gmem + goff), "l"(pol));
  *reinterpret_cast<uint4*>((unsigned*)dst + doff) = v;
}
__device__ __forceinline__ long long tilert_globaltimer() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __noinline__ int tilert_wait_task(const int* row, int* counters, int* err, int epoch, int sm, int t,
                                            long long timeout, int waits, int f_counter, int f_count,
                                            int f_expected, int none, int err_timeout) {
  // the persistent kernel's task wait (runtime/persistent/megakernel.py), run by warp 0: until each
  // wait w of the task row reaches expected * epoch on counters [first, first + count), lane l
  // polling counters l, l + 32, ... (acquire); past the deadline the first waiter to time
  // out records [err_timeout, sm, t, counter] in err. Returns whether err is set (any CTA's). The
  // deadline is on %globaltimer (ns, GPU-wide): a preempted CTA may resume on another SM, whose
  // clock64 is not this one's.
  const long long deadline = tilert_globaltimer() + timeout;
  for (int w = 0; w < waits; ++w) {
    const int first = row[f_counter + 3 * w];
    if (first == none) continue;
    const int target = row[f_expected + 3 * w] * epoch, n = row[f_count + 3 * w];
    for (int j = threadIdx.x & 31; j < n; j += 32) {
      int v, e;
      while (true) {
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(counters + first + j) : "memory");
        asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(e) : "l"(err) : "memory");
        if (v >= target || e != 0) break;
        if (tilert_globaltimer() > deadline && atomicCAS(err, 0, err_timeout) == 0) {
          err[1] = sm;
          err[2] = t;
          err[3] = first + j;
        }
      }
    }
  }
  int e;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(e) : "l"(err) : "memory");
  __syncwarp();
  return e != 0;
}
#endif
"""


_PRELUDE: contextvars.ContextVar[str] = contextvars.ContextVar("tilert_prelude", default=DEVICE_PRELUDE)

# Phase probes: a body marks points of its work (`probe(k)`, k < PROBE_SLOTS) and, in a step kernel
# built with TILERT_PROBES=on, thread 0 stamps %globaltimer there into a static shared array that the
# loop clears when a task starts and copies into the task's trace row when it ends (trace columns
# 3..3+PROBE_SLOTS-1; 0 = the point was not reached). The stamps are thread 0's: a probe placed after
# a CTA barrier times the whole CTA. Off (the default) the bodies emit nothing.
PROBES_ENV = "TILERT_PROBES"
PROBE_CHOICES = ("off", "on")
PROBE_SLOTS = 8
PROBE_PRELUDE = r"""
#ifndef TILERT_PROBE_PRELUDE
#define TILERT_PROBE_PRELUDE
__shared__ long long tilert_probe_ts[@SLOTS@];
__device__ __forceinline__ void tilert_probe(int k) {
  if (threadIdx.x == 0) {
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    tilert_probe_ts[k] = t;
  }
}
__device__ __forceinline__ void tilert_probe_clear() {  // thread 0, which also reads them out
  if (threadIdx.x == 0) {
    for (int k = 0; k < @SLOTS@; ++k) tilert_probe_ts[k] = 0;
  }
}
__device__ __forceinline__ long long tilert_probe_read(int k) { return tilert_probe_ts[k]; }
#endif
""".replace("@SLOTS@", str(PROBE_SLOTS))
_PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("tilert_probing", default=False)


def probes_choice() -> str:
    """TILERT_PROBES: "off" (default) or "on": step kernels built with it stamp the bodies' phases
    (docs/profiling.md); a build switch like the others (kernels/switches.py)."""
    v = os.environ.get(PROBES_ENV, "off") or "off"
    if v not in PROBE_CHOICES:
        raise ValueError(f"{PROBES_ENV}={v!r}: expected one of {', '.join(PROBE_CHOICES)}")
    return v


def probing() -> bool:
    """Whether the bodies being expanded belong to a step kernel built with probes (`using_probes`)."""
    return _PROBING.get()


@contextlib.contextmanager
def using_probes(on: bool) -> Iterator[None]:
    """Bodies expanded inside the block emit their probes (a step kernel whose prelude holds
    PROBE_PRELUDE); standalone kernels never do."""
    token = _PROBING.set(on)
    try:
        yield
    finally:
        _PROBING.reset(token)


def make_probe() -> Any:
    """T.macro `probe(k)`: stamp phase k of the running task when probing, else nothing (a body
    calls it where a phase of its work ends, after a CTA barrier where it can)."""
    import tilelang.language as T

    on = probing()

    @T.macro
    def probe(k):
        if on:
            T.call_extern("handle", "tilert_probe", k)

    return probe


def prelude() -> str:
    """The device-helper source a body imports (`T.import_source(prelude())`): DEVICE_PRELUDE, unless
    a persistent step kernel whose bodies need a superset of it (the streaming GEMV's GEMV_PRELUDE)
    is being built (`using_prelude`). One kernel takes one import string: TileLang refuses two
    different ones, so every body of a kernel must import the same."""
    return _PRELUDE.get()


@contextlib.contextmanager
def using_prelude(src: str) -> Iterator[None]:
    """Bodies expanded inside the block import `src` (a superset of DEVICE_PRELUDE, which it must
    start with): wrap the construction of a kernel's prim_func, where TileLang expands the macros."""
    if not src.startswith(DEVICE_PRELUDE):
        raise ValueError("a step prelude must extend DEVICE_PRELUDE (every body's helpers)")
    token = _PRELUDE.set(src)
    try:
        yield
    finally:
        _PRELUDE.reset(token)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def warp_rows(rows: int, cols: int, limit: int) -> int:
    """The fewest rows >= `rows` (at most `limit`) such that a T.Parallel(rows, cols) loop covers
    whole warps. TileLang lowers a parallel loop of n < threads elements to `if tx < n`; when n is
    not a multiple of 32 that branch is not warp-uniform, and ThreadSync cannot place a barrier
    inside it (a compile error for odd row counts, e.g. a 3-token step). Bodies pad such loops with
    rows whose results are never read (zero rows, or table rows past the last token)."""
    r = rows
    while (r * cols) % 32 and r < limit:
        r += 1
    return r


def gated(body: Any) -> Any:
    """Mark a tile body macro `(..., gate)` as waiting for its inputs itself: the persistent kernel
    hands it a Gate (runtime/persistent/megakernel.py) instead of waiting before it runs."""
    body.tilert_gated = True
    return body


def is_gated(body: Any) -> bool:
    return bool(getattr(body, "tilert_gated", False))


def gate_passed(gate: Any) -> Any:
    """Inside a gated body, after `gate.wait()`: the condition of the `if` holding the rest (a CTA
    barrier: evaluate it once; see megakernel.Gate). Always true standalone (no gate)."""
    return True if gate is None else gate.passed()


def make_mma_reduce(bm: int, groups: int, warps: int):
    """T.macro `mma_reduce(red, acc, out_s, warp, r, c)`: sums the m16n8k16 accumulators of a CTA's
    warps ("swap AB": 16 weight rows x bm tokens per warp, lane (r, c) holding rows r and r + 8,
    token columns 2c, 2c + 1 of each 8-token tile) into out_s [16 * groups, bm] through red [warps,
    16, bm]; warp w belongs to row group w // (warps / groups). Shared by the MXFP4 mainloop (one
    group) and the FP8 GEMV body (block_n / 16 groups)."""
    import tilelang.language as T

    wpg = warps // groups

    @T.macro
    def mma_reduce(red, acc, out_s, warp, r, c):
        for t in T.unroll(bm // 8):
            for h in T.unroll(2):
                for j in T.unroll(2):
                    red[warp, r + 8 * h, t * 8 + 2 * c + j] = acc[t * 4 + h * 2 + j]
        T.sync_threads()
        for i, j in T.Parallel(16 * groups, bm):
            out_s[i, j] = red[(i // 16) * wpg, i % 16, j]
            for w in T.serial(wpg - 1):
                out_s[i, j] = out_s[i, j] + red[(i // 16) * wpg + w + 1, i % 16, j]
        T.sync_threads()

    return mma_reduce


class UnmergedPool:
    """Static shared buffers the bodies of one kernel share by key (`alloc_unmerged(share=key)`):
    a persistent CTA runs one task at a time, so the reduction buffers of two bodies never hold
    live data together, and one buffer of the largest reservation serves them all."""

    def __init__(self) -> None:
        self.need: dict[tuple[str, str], int] = {}  # (key, dtype) -> elements, from the bodies' reservations
        self.bufs: dict[tuple[str, str], Any] = {}  # (key, dtype) -> the buffer, allocated at its first use


_UNMERGED_POOL: contextvars.ContextVar[UnmergedPool | None] = contextvars.ContextVar("tilert_unmerged", default=None)


@contextlib.contextmanager
def using_unmerged_pool() -> Iterator[UnmergedPool]:
    """Bodies constructed and expanded inside the block share their keyed unmerged buffers: wrap
    both the bodies' construction (where they reserve) and the prim_func's (where they allocate)."""
    token = _UNMERGED_POOL.set(UnmergedPool())
    try:
        yield _UNMERGED_POOL.get()  # type: ignore[misc]
    finally:
        _UNMERGED_POOL.reset(token)


def reserve_unmerged(key: str, elems: int, dtype: str) -> None:
    """A body that will `alloc_unmerged((elems,), dtype, share=key)` says so when it is constructed,
    so the first allocation of the key is sized for every body of the kernel (no-op outside a pool)."""
    pool = _UNMERGED_POOL.get()
    if pool is not None:
        pool.need[key, dtype] = max(pool.need.get((key, dtype), 0), elems)


def alloc_unmerged(shape: tuple[int, ...], dtype: str, share: str | None = None) -> Any:
    """A small shared buffer outside TileLang's shared-memory merge (a static `__shared__` array).

    The persistent kernel merges every body's dynamic shared buffers by first and last use in
    statement order, and a loop whose body is a single statement is not a scope there: in
    `for ...: xs[...] = f(X[...], rstd[...])` the loop's store is rstd's last use and xs's first,
    so the two may share bytes, and the first iteration's store overwrites rstd before the next
    iteration reads it (wrong only when the loop runs more than once: full-scale shapes, not the
    tiny configs; docs/performance.md). Buffers read in such a loop go here; static shared memory
    is never merged (tirx.merge_static_smem is off).

    share (a 1-D buffer): inside `using_unmerged_pool`, every body that reserved `share` gets the
    same buffer, of the largest reservation (outside a pool, or unreserved: a buffer of its own)."""
    import tilelang.language as T

    pool = _UNMERGED_POOL.get()
    key = (share or "", dtype)
    if share is None or pool is None or key not in pool.need:
        return T.alloc_shared(shape, dtype, scope="shared")
    if len(shape) != 1 or shape[0] > pool.need[key]:
        raise ValueError(f"alloc_unmerged(share={share!r}): {shape} is not 1-D within its reservation "
                         f"of {pool.need[key]}")  # fmt: skip
    if key not in pool.bufs:
        pool.bufs[key] = T.alloc_shared((pool.need[key],), dtype, scope="shared")
    return pool.bufs[key]


def cache_dir() -> Path:
    """The kernel disk cache directory (created on demand). A pack (precompile_gpu.py --pack) holds
    the cache as kernels/<tilelang version>/...: unpacked into TILERT_KERNEL_CACHE itself, its
    kernels folder is the cache (else every kernel would miss and compile again)."""
    root = Path(os.path.expanduser(os.environ.get("TILERT_KERNEL_CACHE", DEFAULT_CACHE)))
    inner = root / "kernels"
    if inner.is_dir() and [c.name for c in root.iterdir()] == ["kernels"]:
        return inner
    return root


class KernelCompileError(ValueError):
    """A TileLang kernel failed to compile for its target: one line naming the kernel (and, where
    the caller knows it, the shape) and the compiler's own final message, not a TVM stack."""


def compile_error_line(e: BaseException) -> str:
    """The informative line of a TileLang/TVM/nvcc failure (its last non-empty, non-frame line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("File ")]
    line = lines[-1] if lines else type(e).__name__
    return line if len(line) <= 400 else line[:400] + " ..."


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def build(
    func: Any,
    *,
    out_idx: list[int] | int | None = None,
    target: dict[str, str] | str = HOPPER_TARGET,
    pass_configs: dict[str, Any] | None = None,
    compile_flags: list[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    name: str | None = None,
    what: str | None = None,
) -> Any:
    """Compile a TileLang prim_func for `target` (default sm_90a) and return the JITKernel.

    Compiled kernels are cached in memory and on disk under `cache_dir()` (keyed by TileLang on
    the function text, target and options), so a second build of the same config is cheap.
    A compile failure raises KernelCompileError naming the kernel (`what`: its shape, say) and the
    compiler's final message.
    """
    home = _cuda_home()
    if home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = home
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TILELANG_CACHE_DIR"] = str(root)  # tilelang reads this live at each compile
    import tilelang

    _quiet_tilelang_log()

    label = what or name or (str(func.attrs["global_symbol"]) if func.attrs else "kernel")
    try:
        kernel = tilelang.compile(
            func, out_idx=out_idx, target=target, pass_configs=pass_configs, compile_flags=compile_flags
        )
    except Exception as e:  # TVM's InternalError, nvcc failures: many frames of C++ stack
        raise KernelCompileError(f"kernel {label} failed to compile: {compile_error_line(e)}") from e
    over = {fn: v for fn, v in shared_memory_bytes(kernel).items() if sum(v) > CTA_SMEM_LIMIT}
    if over:
        fn, (st, dyn) = next(iter(over.items()))
        raise KernelCompileError(f"kernel {label} does not fit one SM: {fn} needs {st + dyn} bytes of shared "
                                 f"memory ({st} static + {dyn} dynamic), more than the {CTA_SMEM_LIMIT} a CTA "
                                 f"may take on Hopper")  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = name or (str(func.attrs["global_symbol"]) if func.attrs else "kernel")
        (out / f"{stem}.cu").write_text(kernel.get_kernel_source())
    return kernel


def shared_memory_bytes(kernel: Any) -> dict[str, tuple[int, int]]:
    """{device function: (static, dynamic)} bytes of shared memory of a built kernel. The dynamic
    size is the lowered function's `dyn_shared_memory_buf`, known when TileLang compiled it here;
    `build` keeps it in RESOURCES_FILE beside the cached library so a cache hit knows it too (a
    library cached without that file gives {}). The static size is read from the library's cubin."""
    from tilert.kernels import sass

    entry = getattr(kernel, "_tilelang_cache_path", None)  # TileLang tags a kernel with its cache folder
    lib = Path(entry or "", "executable.so")
    if not entry or not lib.exists():
        return {}
    side = lib.with_name(RESOURCES_FILE)
    mod = getattr(getattr(kernel, "artifact", None), "device_mod", None)  # compiled here, not loaded
    if mod is not None:
        dyn = {g.name_hint: int(f.attrs.get("dyn_shared_memory_buf", 0)) if f.attrs else 0
               for g, f in mod.functions.items()}  # fmt: skip
        with contextlib.suppress(OSError):  # a read-only cache: the next hit just goes unchecked
            side.write_text(json.dumps({"dynamic_shared_memory": dyn}))
    elif side.exists():
        dyn = json.loads(side.read_text())["dynamic_shared_memory"]
    else:
        return {}
    return {fn: (sass.static_shared_bytes(lib, fn), d) for fn, d in dyn.items()}


def kernel_resources(kernel: Any) -> dict[str, dict[str, int | None]]:
    """{device function: {"registers", "static_smem", "dynamic_smem"}} of a built kernel: what
    bounds the CTAs an SM holds (`shared_memory_bytes`; registers per thread from the cubin)."""
    from tilert.kernels import sass

    lib = Path(getattr(kernel, "_tilelang_cache_path", "") or "", "executable.so")
    return {fn: {"registers": sass.register_count(lib, fn), "static_smem": st, "dynamic_smem": dyn}
            for fn, (st, dyn) in shared_memory_bytes(kernel).items()}  # fmt: skip


def per_mxfp4_order(build: Any) -> Any:
    """functools.cache for a kernel builder whose source follows the MXFP4 word order in force
    (TILERT_MXFP4_ORDER): the order is part of the key, so a switch never reuses the other's kernel."""
    from tilert.numerics import mxfp4

    cached = functools.cache(lambda order, *args, **kw: build(*args, **kw))

    @functools.wraps(build)
    def wrapper(*args: Any, **kw: Any) -> Any:
        return cached(mxfp4.order_choice(), *args, **kw)

    wrapper.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return wrapper


@functools.cache
def _quiet_tilelang_log() -> None:
    """TileLang logs each compile at INFO through tqdm.write, i.e. to stdout, where it mixes with a
    command's output (`generate` prints its tokens there): its messages go to stderr, WARNING and up
    (TILERT_TILELANG_LOG=INFO shows the compile messages again)."""
    import logging
    import sys

    log = logging.getLogger("tilelang")
    for h in list(log.handlers):
        log.removeHandler(h)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(h.formatter)
        log.addHandler(handler)
    log.setLevel(os.environ.get("TILERT_TILELANG_LOG", "WARNING").upper())


@functools.cache
def hopper_reason() -> str | None:
    """None when a Hopper (sm_90) GPU is usable from torch, else the reason why not."""
    if not torch.cuda.is_available():
        return "needs an NVIDIA Hopper GPU (sm_90); none is visible"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"needs compute capability 9.x (Hopper); this GPU is {major}.{minor}"
    return None


def has_hopper() -> bool:
    return hopper_reason() is None


@functools.cache
def toolchain_reason() -> str | None:
    """None when tilelang is importable and nvcc is found (kernels can be compiled), else why not."""
    try:
        import tilelang  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"tilelang is not importable: {e}"
    if _cuda_home() is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def has_toolchain() -> bool:
    return toolchain_reason() is None


def launch_decode_gemm(kernel: Any, x: Any, w: Any, s: Any, m_pad: int, n: int, split_k: int) -> Any:
    """Run a decode GEMM launcher y[M_pad, N] f32 = x @ W^T: pads x to the compiled M, zeroes y when
    split-K tiles accumulate into it; returns the M valid rows."""
    m, k = x.shape
    xp = x.contiguous()
    if m_pad != m:
        xp = torch.zeros(m_pad, k, dtype=x.dtype, device=x.device)
        xp[:m] = x
    y = (torch.zeros if split_k > 1 else torch.empty)(m_pad, n, dtype=torch.float32, device=x.device)
    kernel(xp, w.contiguous(), s.contiguous(), y)
    return y[:m]


def make_row_rstd(rows: int, k: int, eps: float):
    """T.macro `row_rstd(X, row0, out)`: out[i] = rsqrt(mean(X[row0 + i, :k]^2) + eps) for i < rows,
    the RMSNorm scale of the rows that can hold tokens. Wide column chunks (up to 8192 / rows
    elements per row), so one CTA's loads are in flight together instead of one 128-column step at
    a time. Shared by the fused linear's and the streaming GEMV's norm prologues. A row count whose
    chunk does not split evenly over the CTA (5 rows x 128) is computed for the next power of two
    (X must hold those rows: activations are padded) and only `rows` results are written."""
    import tilelang.language as T

    f32 = "float32"

    def width(r: int) -> int:
        return next(w for w in (8192 // r, 4096 // r, 2048 // r, 1024, 512, 256, 128) if w <= k and k % w == 0)

    rp = rows if rows * width(rows) % 256 == 0 else 1 << (rows - 1).bit_length()
    cw = width(rp)

    @T.macro
    def row_rstd(X, row0, out):
        sq = T.alloc_fragment((rp, cw), f32)
        rs = T.alloc_fragment((rp,), f32)
        T.clear(sq)
        for kc in T.serial(k // cw):
            for i, j in T.Parallel(rp, cw):
                v = T.Cast(f32, X[row0 + i, kc * cw + j])
                sq[i, j] += v * v
        T.reduce_sum(sq, rs, dim=1)
        for i in T.Parallel(rp):
            if rp == rows or i < rows:  # a python True when no row is padding: no guard at all
                out[i] = T.rsqrt(rs[i] / k + eps)

    return row_rstd
