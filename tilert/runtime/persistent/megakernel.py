"""The persistent-kernel skeleton: one CTA per SM runs its row of the task table.

`make_persistent_loop` builds the macro every persistent program shares: read a task row;
wait (acquire) until each wait counter reaches need * epoch, warp 0's lanes polling a wait's
counters in parallel (a top-k waiting on 96 router chunks pays three round trips, not 96), or with
`cta_wait` (the step kernel's default) every thread one counter of the row's waits, bounded
by a %globaltimer deadline; on timeout it raises the error flag and
every CTA drains without running bodies; then the body for the row's opcode runs (the same
TileLang body the standalone launchers use); then thread 0 signals (release). Counters are never
reset: targets scale with the epoch. Each task's start (before its waits), ready (waits done) and
end stamps, from the GPU-wide %globaltimer in ns, go to a trace buffer [sms, tasks, 3] (per-SM
timelines for the profiler: wait and run time apart).

The body runs the wait itself (Gate): a `gated` body first issues the loads that do not depend on
the step's data (a GEMV's first weight stages, attention's first KV tiles) into its shared memory,
then waits, so their DRAM latency overlaps the wait instead of following it (the step program
gates its GEMV and attention-split bodies only with TILERT_EARLY_LOADS=1, off by default: on the
H200 it gains nothing at B=1 and costs ~10% at B=8, docs/performance.md); any other body is
waited for before it starts. The wait is one non-inlined device function shared by every body's
call site (tilert_wait_task; with rows in shared memory tilert_wait_row, or tilert_wait_row_cta).

Error buffer (int32[4]): [code, sm, task slot, counter] of the first wait that timed out
(code ERR_TIMEOUT), or [ERR_OPCODE, -, -, opcode] for an opcode with no body (the dispatch traps).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from tilert.abi import DEFAULT_TIMEOUT_NS, ERR_OPCODE, ERR_TIMEOUT, FIELD, NONE, OPCODES, WAITS
from tilert.kernels.common import PROBE_SLOTS, gated, is_gated, prelude
from tilert.kernels.views import PERSISTENT_THREADS

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

# No warp specialisation and no TMA in persistent kernels: a specialised producer warp would issue
# a task's loads before thread 0's wait completes (reading data another SM has not yet written),
# and cp.async through L2 keeps cross-SM reads coherent with the release/acquire counters.
# Aggressive shared-memory merging: the bodies of different opcodes never run at once, so their
# shared buffers may overlap (without it the allocations of a whole step's bodies add up).
PERSISTENT_PASS_CONFIGS = {
    "tl.disable_warp_specialized": True,
    "tl.disable_tma_lower": True,
    "tl.enable_aggressive_shared_memory_merge": True,
}


class PersistentError(RuntimeError):
    """The persistent program cannot run this graph (no body for a node kind, shapes off-contract),
    or a launch failed (a bounded wait timed out, the grid could not be resident). One line that
    names the cause: the CLI prints it without a stack."""

    user_facing = True


class Gate(NamedTuple):
    """A task's input wait, handed to a body that issues data-independent loads first (weights, the
    KV cache's old keys): `wait()` (every thread, once) has warp 0 wait for the task's inputs;
    `passed()` is then the condition of the `if` that holds the rest of the body: a CTA barrier
    (__syncthreads_or of warp 0's verdict) that is true unless some wait timed out. Evaluate it
    once, outside thread-dependent branches. (An if on the barrier's result is what TileLang's
    ThreadSync accepts around the rest's own barriers; a flag in a local variable is not.) Bodies
    without the `gated` mark are waited for before they run."""

    wait: Any
    flags: Any  # local int32[1]: warp 0's verdict (1: a wait timed out)

    def passed(self) -> Any:
        import tilelang.language as T

        return T.call_extern("int32", "__syncthreads_or", self.flags[0]) == 0


def run_gated(body: Any, gate: Any, *args: Any) -> Any:
    """Expand `body(*args)` under the Gate protocol (call inside a T.macro): a gated body gets the
    gate; any other is waited for first."""
    import tilelang.language as T

    @T.macro
    def plain():
        gate.wait()
        if gate.passed():
            body(*args)

    @T.macro
    def early():
        body(*args, gate)

    return early() if is_gated(body) else plain()


def make_dispatch(bodies: dict[str, Any], tree: bool = False) -> Any:
    """A macro `dispatch(bufs, err, op_code, op, c0, c1, c2, gate)`: the body whose opcode matches,
    under the Gate protocol; an opcode with no body raises the error flag (ERR_OPCODE) instead of
    running. The tests are a chain of ifs in the bodies' order, or with `tree` a binary search over
    the opcodes (each body marked `tilert_body(opcode)` in the source: the compiler drops a leaf's
    test that the search already implies): each test sits before its body's code, so a chain walks
    one instruction line per earlier case, and those lines are cold whenever the SM ran other
    bodies since (log2 of them in a tree)."""
    import tilelang.language as T

    for name in bodies:
        if name not in OPCODES:
            raise KeyError(f"no opcode for persistent body '{name}' in tilert.abi.OPCODES")
    names = sorted(bodies, key=OPCODES.get) if tree else list(bodies)

    @T.macro
    def trap(bufs, err, code, op, c0, c1, c2, gate):
        if T.atomic_add(err[0], ERR_OPCODE, return_prev=True) == 0:
            err[3] = code

    def chain(i: int) -> Any:
        if i == len(names):
            return trap
        body, rest, code = bodies[names[i]], chain(i + 1), OPCODES[names[i]]

        @T.macro
        def step(bufs, err, opc, op, c0, c1, c2, gate):
            if opc == code:
                run_gated(body, gate, bufs, op, c0, c1, c2)
            else:
                rest(bufs, err, opc, op, c0, c1, c2, gate)

        return step

    def search(lo: int, hi: int) -> Any:  # names[lo:hi], sorted by opcode
        if hi - lo == 1:
            body, code = bodies[names[lo]], OPCODES[names[lo]]

            @T.macro
            def leaf(bufs, err, opc, op, c0, c1, c2, gate):
                if opc == code:
                    T.call_extern("handle", "tilert_body", code)
                    run_gated(body, gate, bufs, op, c0, c1, c2)
                else:
                    trap(bufs, err, opc, op, c0, c1, c2, gate)

            return leaf
        mid = (lo + hi) // 2
        left, right, pivot = search(lo, mid), search(mid, hi), OPCODES[names[mid]]

        @T.macro
        def node(bufs, err, opc, op, c0, c1, c2, gate):
            if opc < pivot:
                left(bufs, err, opc, op, c0, c1, c2, gate)
            else:
                right(bufs, err, opc, op, c0, c1, c2, gate)

        return node

    return search(0, len(names)) if tree and names else chain(0)


def if_chain(cases: list[tuple[int, Any]], selector: Any, tree: bool = False) -> Any:
    """A gated macro `(bufs, op, c0, c1, c2, gate)` running the body of the case whose key equals
    selector(bufs, op) under the Gate protocol (a chain of ifs, or with `tree` a binary search over
    the keys, each body marked `tilert_node_class(key)`; no case matches: nothing runs)."""
    import tilelang.language as T

    def chain(i: int) -> Any:
        key, body = cases[i]
        if i == len(cases) - 1:

            @T.macro
            def last(bufs, op, c0, c1, c2, gate):
                if selector(bufs, op) == key:
                    run_gated(body, gate, bufs, op, c0, c1, c2)

            return last
        rest = chain(i + 1)

        @T.macro
        def step(bufs, op, c0, c1, c2, gate):
            if selector(bufs, op) == key:
                run_gated(body, gate, bufs, op, c0, c1, c2)
            else:
                rest(bufs, op, c0, c1, c2, gate)

        return step

    ordered = sorted(cases, key=lambda c: c[0])

    def search(lo: int, hi: int) -> Any:
        if hi - lo == 1:
            key, body = ordered[lo]

            @T.macro
            def leaf(bufs, op, c0, c1, c2, gate):
                if selector(bufs, op) == key:
                    T.call_extern("handle", "tilert_node_class", key)
                    run_gated(body, gate, bufs, op, c0, c1, c2)

            return leaf
        mid = (lo + hi) // 2
        left, right, pivot = search(lo, mid), search(mid, hi), ordered[mid][0]

        @T.macro
        def node(bufs, op, c0, c1, c2, gate):
            if selector(bufs, op) < pivot:
                left(bufs, op, c0, c1, c2, gate)
            else:
                right(bufs, op, c0, c1, c2, gate)

        return node

    return gated(search(0, len(ordered)) if tree else chain(0))


PREFETCH_ROWS = 256  # most rows one task's prefetch region spans (a GEMV tile has 64)

# The wait of a loop whose rows sit in shared memory (rows_smem): as tilert_wait_task (DEVICE_PRELUDE),
# but a lane that polled keeps the error word its last poll read instead of reading it once more
# after the polls (one global-memory round trip less per task); a lane with nothing to poll reads it
# at once, beside the others' polls. Added to the step kernel's prelude (runtime/persistent/step.py).
ROWS_PRELUDE = r"""
#ifndef TILERT_ROWS_PRELUDE
#define TILERT_ROWS_PRELUDE
// markers (no code): the start of an opcode's body and of a node class's body in a binary-search
// dispatch, whose leaves' own tests the compiler may drop (tools find the bodies by them)
__device__ __forceinline__ void tilert_body(int opcode) {}
__device__ __forceinline__ void tilert_node_class(int node_class) {}
__device__ __noinline__ int tilert_wait_row(const int* row, int* counters, int* err, int epoch, int sm, int t,
                                           long long timeout, int waits, int f_counter, int f_count,
                                           int f_expected, int none, int err_timeout) {
  const long long deadline = tilert_globaltimer() + timeout;
  int e = 0;
  bool polled = false;
  for (int w = 0; w < waits; ++w) {
    const int first = row[f_counter + 3 * w];
    if (first == none) continue;
    const int target = row[f_expected + 3 * w] * epoch, n = row[f_count + 3 * w];
    for (int j = threadIdx.x & 31; j < n; j += 32) {
      int v;
      polled = true;
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
  if (!polled) asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(e) : "l"(err) : "memory");
  __syncwarp();
  return e != 0;
}
#endif
"""


def _cta_wait_prelude() -> str:
    """TILERT_WAIT_THREADS=cta (switches.wait_choice): ROWS_PRELUDE's wait with every thread of the CTA
    polling. An already-reached counter still costs an acquire load's L2 round trip, and one thread's
    acquire loads do not overlap, so a warp-0 wait on 96 router counters (the top-k) or on the q, k
    and v chunks (an attention split: three waits, 101 counters) pays three to five round trips one
    after another. Here thread i takes counters i, i + blockDim.x, ... of the concatenation of the
    row's waits (wait 0's counters, then wait 1's, ...), so up to blockDim.x counters over all the
    waits cost one round trip; the caller's barrier or-s the verdicts (no __syncwarp). The poll of
    one counter is tilert_wait_row's (the same loads, timeout and error report); added to the step's
    prelude only with the switch."""
    start = ROWS_PRELUDE.index("      while (true) {")
    poll = ROWS_PRELUDE[start : ROWS_PRELUDE.index("      }\n    }\n  }\n", start) + len("      }\n")]
    if "counters + first + j" not in poll or "err[3] = first + j;" not in poll:
        raise AssertionError("tilert_wait_row changed: its poll loop is not the one the CTA wait reuses")
    return r"""
#ifndef TILERT_CTA_WAIT_PRELUDE
#define TILERT_CTA_WAIT_PRELUDE
__device__ __noinline__ int tilert_wait_row_cta(const int* row, int* counters, int* err, int epoch, int sm, int t,
                                               long long timeout, int waits, int f_counter, int f_count,
                                               int f_expected, int none, int err_timeout) {
  const long long deadline = tilert_globaltimer() + timeout;
  int e = 0;
  bool polled = false;
  int total = 0;
  for (int w = 0; w < waits; ++w)
    if (row[f_counter + 3 * w] != none) total += row[f_count + 3 * w];
  for (int g = threadIdx.x; g < total; g += blockDim.x) {
    int first = none, target = 0, j = g;
    for (int w = 0; w < waits; ++w) {  // g's wait and its counter j in it
      const int f = row[f_counter + 3 * w];
      if (f == none) continue;
      const int n = row[f_count + 3 * w];
      if (j < n) { first = f; target = row[f_expected + 3 * w] * epoch; break; }
      j -= n;
    }
    int v;
    polled = true;
""" + poll + r"""  }
  if (!polled) asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(e) : "l"(err) : "memory");
  return e != 0;
}
#endif
"""


CTA_WAIT_PRELUDE = _cta_wait_prelude()


def make_persistent_loop(
    bodies: dict[str, Any], *, max_tasks: Any, timeout_ns: int = DEFAULT_TIMEOUT_NS, prefetch: bool = False,
    rows_smem: bool = False, views: int = 0, probes: bool = False, cta_wait: bool = False,
) -> Any:
    """Macro `loop(sm, tasks, counters, err, epoch, trace, bufs[, pf])`; call inside `T.Kernel(num_sms, ...)`.
    max_tasks: the queue length, an int or the tasks tensor's symbolic shape (T.dynamic: the step
    kernel, so that one kernel runs every table of its bodies).

    Rows follow tilert.abi.TASK_FIELDS. `bodies[name]` (name: a tilert.abi.OPCODES key) is a
    T.macro `(bufs, op, c0, c1, c2)`: the program's buffers (a tuple) and the row's coordinates.
    With `prefetch`, pf is an int64 [sms, tasks, 4] table of each task's weight region (address,
    bytes per row, rows, row stride; rows = 0: none): while warp 0 waits for a task's inputs, the
    other warps ask L2 for the next task's region (cp.async.bulk.prefetch), so that task's weight
    loads meet L2 instead of DRAM. Weights never depend on the step's data, so this is always safe.

    The loop ends at the first NOP row (queues are packed; a short queue does not walk its padding).
    With `rows_smem` (TILERT_TASK_ROWS=shared, `switches.rows_choice`): each task's row sits in shared memory before
    the task starts (warp 0 loads the next row into registers when a task starts and stores it
    before the task's closing barrier), the wait reads its ranges there (tilert_wait_row: no second
    read of the error word after a poll), and the dispatch is a binary search over the opcodes and
    node classes: a task's pick-up pays no global-memory round trip for its row. Then bufs is the
    step's (NodeClass, Ptrs), and the bodies get (rows, ptrs, b, Ptrs): rows[b] the task's row, ptrs
    the first `views` pointers of its node, which the threads after warp 0 copy from Ptrs[op] into
    shared memory while warp 0 waits (the step's views read them there after the Gate's barrier).

    With `cta_wait` (and rows_smem; a kernel whose prelude holds CTA_WAIT_PRELUDE): every thread
    polls a share of the wait's counters (tilert_wait_row_cta), the verdicts are or-ed by a CTA
    barrier, and the ready stamp follows that barrier.

    With `probes` (a kernel whose prelude holds common.PROBE_PRELUDE), trace is [sms, tasks, 3 +
    PROBE_SLOTS]: thread 0 clears the probe stamps when a task starts and copies them after its end
    stamp (common.make_probe: the bodies' phase stamps).
    """
    import tilelang.language as T

    from tilert.kernels import common

    dispatch = make_dispatch(bodies, tree=rows_smem)
    cta = rows_smem and cta_wait
    W = len(FIELD)
    if rows_smem and not 0 < views <= PERSISTENT_THREADS - 32:
        raise ValueError(f"persistent loop with rows in shared memory: views must be 1..{PERSISTENT_THREADS - 32}, "
                         f"not {views}")  # fmt: skip
    F = FIELD
    others = PERSISTENT_THREADS - 32  # the CTA's threads outside warp 0 (prefetch: step kernels only)

    @T.macro
    def prefetch_region(pf, sm, t, tx):
        rows = pf[sm, t, 2]
        for rr in T.serial(T.ceildiv(PREFETCH_ROWS, others)):
            r = rr * others + tx - 32
            if r < rows:
                T.call_extern("handle", "tilert_prefetch_bulk_l2", pf[sm, t, 0] + r * pf[sm, t, 3],
                              T.cast(pf[sm, t, 1], "int32"))  # fmt: skip

    @T.macro
    def warp0_wait(sm, t, tasks, rows, b, counters, err, epoch, stamps, flags, tx):
        if tx < 32:
            # the row layout's offsets and the timeout as arguments: the prelude is one string per kernel
            # (the row's address inline in each call: a name bound to it would be a void* let)
            if rows_smem:
                flags[0] = T.call_extern("int32", "tilert_wait_row", T.address_of(rows[b, 0]), counters.data,
                                         err.data, epoch[0], sm, t, T.int64(timeout_ns), WAITS, F["wait0_counter"],
                                         F["wait0_count"], F["wait0_expected"], NONE, ERR_TIMEOUT)  # fmt: skip
            else:
                flags[0] = T.call_extern("int32", "tilert_wait_task", T.address_of(tasks[sm, t, 0]), counters.data,
                                         err.data, epoch[0], sm, t, T.int64(timeout_ns), WAITS, F["wait0_counter"],
                                         F["wait0_count"], F["wait0_expected"], NONE, ERR_TIMEOUT)  # fmt: skip
            if tx == 0:
                stamps[1] = T.call_extern("int64", "tilert_globaltimer")

    @T.macro
    def wait_inputs(sm, t, tasks, rows, b, counters, err, epoch, stamps, flags):  # Gate.wait
        """Warp 0 waits for the task's inputs (tilert_wait_task in DEVICE_PRELUDE, or tilert_wait_row
        with rows in shared memory: lane l polls counters l, l + 32, ... of each wait in turn, so a
        top-k waiting on 96 router chunks pays three round trips, not 96; it is not inlined, so every
        body's call site shares one copy of the code, which stays hot in the instruction cache):
        flags[0] = its verdict, handed to every thread by the barrier in Gate.passed(). The row: tasks[sm,
        t], or rows[b] in shared memory. stamps[1]: when the inputs were ready (thread 0). With
        `cta_wait` every thread polls (tilert_wait_row_cta) and a barrier or-s the verdicts."""
        tx = T.get_thread_binding()
        if cta:  # every thread polls its share; the barrier hands every verdict to all
            flags[0] = T.call_extern("int32", "tilert_wait_row_cta", T.address_of(rows[b, 0]), counters.data,
                                     err.data, epoch[0], sm, t, T.int64(timeout_ns), WAITS, F["wait0_counter"],
                                     F["wait0_count"], F["wait0_expected"], NONE, ERR_TIMEOUT)  # fmt: skip
            flags[0] = T.call_extern("int32", "__syncthreads_or", flags[0])
            if tx == 0:
                stamps[1] = T.call_extern("int64", "tilert_globaltimer")
        else:
            warp0_wait(sm, t, tasks, rows, b, counters, err, epoch, stamps, flags, tx)

    @T.macro
    def loop(sm, tasks, counters, err, epoch, trace, bufs, pf=None):
        T.import_source(prelude())
        tx = T.get_thread_binding()
        stamps = T.alloc_local((2,), "int64")  # the task's start and ready times (thread 0's)
        flags = T.alloc_local((1,), "int32")  # warp 0's verdict: a wait timed out
        # the row's operands in registers: a body that indexed tasks[...] directly would reload them
        # from global memory at every use (the loads cannot move across its barriers and asm)
        op = T.alloc_var("int32")
        c0 = T.alloc_var("int32")
        c1 = T.alloc_var("int32")
        c2 = T.alloc_var("int32")
        opc = T.alloc_var("int32")
        if rows_smem:
            rows = common.alloc_unmerged((2, W), "int32")  # this task's row and the next (static: never merged)
            nxt = T.alloc_var("int32")  # lane l < W of warp 0: field l of the next row, in flight during a task
            ptrs = common.alloc_unmerged((views,), "int64")  # the task's node's pointers
            if tx < W:
                rows[0, tx] = tasks[sm, 0, tx]
            T.sync_threads()
        if prefetch:
            if tx >= 32:
                prefetch_region(pf, sm, 0, tx)
        for t in T.serial(max_tasks):
            b = t % 2
            if rows_smem:
                opc = rows[b, F["opcode"]]
            else:
                opc = tasks[sm, t, F["opcode"]]
            if opc == 0:  # queues are packed: the rest is padding
                T.loop_break()
            flags[0] = 0
            if rows_smem:
                if tx < W:
                    nxt = tasks[sm, T.min(t + 1, max_tasks - 1), tx]
            if prefetch:
                if tx >= 32 and t + 1 < max_tasks:  # the next task's weights into L2 while this one waits
                    prefetch_region(pf, sm, t + 1, tx)
            if tx == 0:
                if probes:
                    T.call_extern("handle", "tilert_probe_clear")
                stamps[0] = T.call_extern("int64", "tilert_globaltimer")
                # the row after next into L2 while this task waits and runs (its first touch)
                T.call_extern("handle", "tilert_prefetch_l2", T.address_of(tasks[sm, T.min(t + 2, max_tasks - 1), 0]))
            if rows_smem:
                op = rows[b, F["op"]]
                c0 = rows[b, F["c0"]]
                c1 = rows[b, F["c1"]]
                c2 = rows[b, F["c2"]]
            else:
                op = tasks[sm, t, F["op"]]
                c0 = tasks[sm, t, F["c0"]]
                c1 = tasks[sm, t, F["c1"]]
                c2 = tasks[sm, t, F["c2"]]
            if rows_smem:  # warps 1.. copy the node's pointers while warp 0 waits (read after Gate.passed())
                if tx >= 32 and tx < 32 + views:
                    ptrs[tx - 32] = T.reinterpret(bufs[1][op, tx - 32], "int64")
            # the body runs the wait (Gate): a gated body first issues its data-independent loads
            gate = Gate(functools.partial(wait_inputs, sm, t, tasks, rows if rows_smem else None, b, counters, err,
                                          epoch, stamps, flags), flags)  # fmt: skip
            if rows_smem:
                dispatch((rows, ptrs, b, bufs[1]), err, opc, op, c0, c1, c2, gate)
            else:
                dispatch(bufs, err, opc, op, c0, c1, c2, gate)
            if rows_smem:
                if tx < W:
                    rows[1 - b, tx] = nxt
            T.sync_threads()
            if tx == 0:
                if rows_smem:
                    if rows[b, F["signal"]] != NONE:
                        T.atomic_add(counters[rows[b, F["signal"]]], 1, memory_order="release")
                else:
                    if tasks[sm, t, F["signal"]] != NONE:
                        T.atomic_add(counters[tasks[sm, t, F["signal"]]], 1, memory_order="release")
                trace[sm, t, 0] = stamps[0]
                trace[sm, t, 1] = T.call_extern("int64", "tilert_globaltimer")
                trace[sm, t, 2] = stamps[1]
                if probes:
                    for k in T.unroll(PROBE_SLOTS):
                        trace[sm, t, 3 + k] = T.call_extern("int64", "tilert_probe_read", k)

    return loop


def raise_on_error(err: list[int]) -> None:
    """Turn the kernel's error buffer into an exception naming the task (or do nothing)."""
    if err[0] == 0:
        return
    if err[0] == ERR_OPCODE:
        raise PersistentError(f"persistent kernel met opcode {err[3]}, which has no body in this program")
    if err[1] == -1:
        raise PersistentError(f"persistent kernel collective wait timed out: tile {-1 - err[3]} never saw every rank "
                           f"arrive (a peer not running, or ranks out of step)")  # fmt: skip
    raise PersistentError(
        f"persistent kernel wait timed out: sm {err[1]}, task slot {err[2]}, counter {err[3]} "
        f"(schedule deadlock or a lost signal)"
    )
