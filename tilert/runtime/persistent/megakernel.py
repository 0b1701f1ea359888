"""The persistent-kernel skeleton: one CTA per SM runs its row of the task table.

`make_persistent_loop` builds the macro every persistent program shares: read a task row;
thread 0 waits (acquire) until each wait counter reaches need * epoch, bounded by a clock64
deadline (no device prelude, so task bodies keep theirs); on timeout it raises the error flag and
every CTA drains without running bodies; then the body for the row's opcode runs (the same
TileLang body the standalone launchers use); then thread 0 signals (release). Counters are never
reset: targets scale with the epoch. Each task's start/end clock64 stamps go to a trace buffer
(per-SM timelines for the profiler).

Error buffer (int32[4]): [flag, sm, task_id, counter] of the first wait that timed out.
"""

from __future__ import annotations

from typing import Any

from tilert.runtime.persistent.tasks import COL_ARGS, COL_ID, COL_OP, COL_SIGNAL, COL_WAIT, NONE, OpcodeTable

# No warp specialisation and no TMA in persistent kernels: a specialised producer warp would issue
# a task's loads before thread 0's wait completes (reading data another SM has not yet written),
# and cp.async through L2 keeps cross-SM reads coherent with the release/acquire counters.
PERSISTENT_PASS_CONFIGS = {"tl.disable_warp_specialized": True, "tl.disable_tma_lower": True}

DEFAULT_TIMEOUT_CYCLES = 4_000_000_000  # ~2 s at 2 GHz: far beyond any step, short enough to report a deadlock


def make_dispatch(opcodes: OpcodeTable, bodies: dict[str, Any]) -> Any:
    """A macro `dispatch(bufs, op, a0..a7)` running the body whose opcode matches (a chain of ifs)."""
    import tilelang.language as T

    missing = [n for n in opcodes.names[1:] if n not in bodies]
    if missing:
        raise ValueError(f"no persistent body for task kind(s) {missing}")

    def chain(names: list[str]) -> Any:
        if not names:
            return None
        body, rest, code = bodies[names[0]], chain(names[1:]), opcodes[names[0]]
        if rest is None:

            @T.macro
            def last(bufs, op, a0, a1, a2, a3, a4, a5, a6, a7):
                if op == code:
                    body(bufs, a0, a1, a2, a3, a4, a5, a6, a7)

            return last

        @T.macro
        def step(bufs, op, a0, a1, a2, a3, a4, a5, a6, a7):
            if op == code:
                body(bufs, a0, a1, a2, a3, a4, a5, a6, a7)
            else:
                rest(bufs, op, a0, a1, a2, a3, a4, a5, a6, a7)

        return step

    return chain(opcodes.names[1:])


def make_persistent_loop(
    opcodes: OpcodeTable, bodies: dict[str, Any], *, max_tasks: int, timeout_cycles: int = DEFAULT_TIMEOUT_CYCLES
) -> Any:
    """Macro `loop(sm, tasks, counters, err, epoch, trace, bufs)`; call inside `T.Kernel(num_sms, ...)`.

    `bodies[name]` is a T.macro `(bufs, a0..a7)`: the program's buffers (a tuple) and the 8 int32
    task args; it emits the task's body.
    """
    import tilelang.language as T

    dispatch = make_dispatch(opcodes, bodies)

    @T.macro
    def loop(sm, tasks, counters, err, epoch, trace, bufs):
        tx = T.get_thread_binding()
        deadline = T.alloc_var("int64")
        t0 = T.alloc_var("int64")
        for t in T.serial(max_tasks):
            op = tasks[sm, t, COL_OP]
            if op != 0:
                if tx == 0:
                    t0 = T.call_extern("int64", "clock64")
                    for w in T.serial(2):
                        cid = tasks[sm, t, COL_WAIT + 2 * w]
                        if cid != NONE:
                            target = tasks[sm, t, COL_WAIT + 2 * w + 1] * epoch[0]
                            deadline = t0 + timeout_cycles
                            while (
                                T.atomic_load(counters[cid], memory_order="acquire") < target
                                and T.atomic_load(err[0], memory_order="relaxed") == 0
                            ):
                                if T.call_extern("int64", "clock64") > deadline:
                                    if T.atomic_add(err[0], 1, return_prev=True) == 0:
                                        err[1] = sm
                                        err[2] = tasks[sm, t, COL_ID]
                                        err[3] = cid
                T.sync_threads()
                if T.atomic_load(err[0], memory_order="relaxed") == 0:
                    dispatch(
                        bufs,
                        op,
                        tasks[sm, t, COL_ARGS],
                        tasks[sm, t, COL_ARGS + 1],
                        tasks[sm, t, COL_ARGS + 2],
                        tasks[sm, t, COL_ARGS + 3],
                        tasks[sm, t, COL_ARGS + 4],
                        tasks[sm, t, COL_ARGS + 5],
                        tasks[sm, t, COL_ARGS + 6],
                        tasks[sm, t, COL_ARGS + 7],
                    )
                T.sync_threads()
                if tx == 0:
                    sig = tasks[sm, t, COL_SIGNAL]
                    if sig != NONE:
                        T.atomic_add(counters[sig], 1, memory_order="release")
                    trace[sm, t, 0] = t0
                    trace[sm, t, 1] = T.call_extern("int64", "clock64")

    return loop
