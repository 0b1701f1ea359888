"""Build switches: environment variables the compiler and the persistent step read while they build
a step (which body a kind of task runs, where the MoE top-k runs). A table and its step program must
be built under the same ones (PersistentStep checks what it can). `current()` names the values in
force, so a measured trace can record them and the calibration rebuild the same tasks; `applied`
sets some of them for a with-block (benchmarks/step_variants.py's variants, stored traces)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

from tilert.kernels import attention, common, linear_fused, linear_tiling, moe
from tilert.numerics import mxfp4

ROWS_ENV = "TILERT_TASK_ROWS"  # where the persistent loop reads a task's row (rows_choice)
ROWS_CHOICES = ("global", "shared")
PIN_ENV = "TILERT_PIN"  # which tasks the schedule pass keeps on SMs of their own (pin_choice)
PIN_CHOICES = ("none", "swa", "moe")
QUIET_ENV = "TILERT_PREFETCH_QUIET"  # which tasks ask L2 for no weights while they run (prefetch_quiet)
QUIET_CHOICES = ("none", "experts")
WAIT_ENV = "TILERT_WAIT_THREADS"  # which threads of a task poll its input counters (wait_choice)
WAIT_CHOICES = ("warp", "cta")
EARLY_ENV = "TILERT_EARLY_LOADS"  # which bodies issue their data-independent loads before their wait (early_choice)
EARLY_CHOICES = ("0", "1", "attn")


def rows_choice() -> str:
    """TILERT_TASK_ROWS: "shared" (default): the next task's row is loaded while a task runs and waits
    in shared memory with its node's class, the wait reads it there, warp 1 copies the node's
    pointers into shared memory during the wait, and the dispatch is a binary search; "global":
    each task reads its row, class and pointers from global memory when it starts, and dispatches
    through a chain of ifs (runtime/persistent/megakernel.make_persistent_loop). "shared" was
    8.5% faster at B=1 and 2% at B=8 at full scale on the H100 (docs/performance.md)."""
    v = os.environ.get(ROWS_ENV, "shared") or "shared"
    if v not in ROWS_CHOICES:
        raise ValueError(f"{ROWS_ENV}={v!r}: expected one of {', '.join(ROWS_CHOICES)}")
    return v


def pin_choice() -> str:
    """TILERT_PIN: "none" (default): every task may go to any SM; "swa": the split tasks of the
    sliding-window attention nodes (and the MOE_TOPK tasks, where the top-k is a task) run on SMs
    that run nothing else, so their code stays in those SMs' instruction cache from one layer to
    the next; "moe": also the MoE's tasks on half of the other SMs, everything else on the rest
    (passes/schedule.py). Both measured slower than one pool at full scale (docs/passes.md)."""
    v = os.environ.get(PIN_ENV, "none") or "none"
    if v not in PIN_CHOICES:
        raise ValueError(f"{PIN_ENV}={v!r}: expected one of {', '.join(PIN_CHOICES)}")
    return v


def prefetch_quiet() -> str:
    """TILERT_PREFETCH_QUIET, read when a persistent step builds its prefetch table: "experts"
    (default): the MoE expert tasks (MOE_GATE_UP, MOE_DOWN) ask L2 for no weights (the persistent
    loop asks for the next task's weight region while a task waits and runs), so the expert rows
    they stream from DRAM, known only once the top-k has run and on the step's critical path, do not
    share the DRAM with the prefetch of the next layer's q/k/v tiles, which then read their own
    weights: 0.991x-0.996x of "none" at B=1 and 0.998x at B=8 at full scale on an H100
    (docs/performance.md); "none": every task asks for its successor's region. The table changes,
    not the kernel."""
    v = os.environ.get(QUIET_ENV, "experts") or "experts"
    if v not in QUIET_CHOICES:
        raise ValueError(f"{QUIET_ENV}={v!r}: expected one of {', '.join(QUIET_CHOICES)}")
    return v


def wait_choice() -> str:
    """TILERT_WAIT_THREADS: "cta" (default): thread i of the CTA polls counter i, i + 256, ... of the
    concatenation of a task's waits and a barrier or-s the verdicts (one L2 round trip for up to 256
    counters over all the waits); "warp": warp 0 polls, lane l the counters l, l + 32, ... of each
    wait one after another (an acquire load each, a round trip even when the counter is reached:
    three for the top-k's 96 router counters, five for an attention split's 101 q/k/v counters).
    "cta" was 0.93x-0.94x of "warp"'s step at B=1 and 0.99x at B=8 at full scale on an H100
    (docs/performance.md). Only with TILERT_TASK_ROWS=shared (the wait of a row in shared memory;
    with "global" warp 0 polls); the step kernel changes, not the table."""
    v = os.environ.get(WAIT_ENV, "cta") or "cta"
    if v not in WAIT_CHOICES:
        raise ValueError(f"{WAIT_ENV}={v!r}: expected one of {', '.join(WAIT_CHOICES)}")
    return v


def early_choice() -> str:
    """TILERT_EARLY_LOADS: which task bodies run in their gated form (runtime/persistent/megakernel.Gate:
    the loads that need no earlier task's output are issued, then the task waits). "0" (default):
    none; "1": the GEMV and attention-split bodies (weights, KV tiles: 1.25x / 1.18x slower at B=1 /
    B=8 at full scale on an H100, docs/performance.md); "attn": the attention splits only, whose old
    keys and RoPE table need nothing of the step, and whose queue puts them after the previous MoE's
    last task, so they wait for q/k/v (median 12 us at B=1, 18 us at B=8 for a sliding-window split)
    with nothing in flight; measured 1.16x / 1.08x slower all the same (the gated body took the step
    kernel to 255 registers, and the other bodies slowed). The step kernel changes, not the table."""
    v = os.environ.get(EARLY_ENV, "0") or "0"
    if v not in EARLY_CHOICES:
        raise ValueError(f"{EARLY_ENV}={v!r}: expected one of {', '.join(EARLY_CHOICES)}")
    return v


# switch -> the function that reads it (and refuses a value it does not know)
SWITCHES: dict[str, Callable[[], str]] = {
    linear_fused.BODY_ENV: linear_fused.body_choice,
    moe.BODY_ENV: moe.body_choice,
    moe.TOPK_ENV: moe.topk_place,
    PIN_ENV: pin_choice,
    ROWS_ENV: rows_choice,
    common.PROBES_ENV: common.probes_choice,
    linear_tiling.TILES_ENV: linear_tiling.tiles_choice,
    QUIET_ENV: prefetch_quiet,
    linear_fused.NORM_STATS_ENV: linear_fused.norm_stats_choice,
    moe.LOADS_ENV: moe.loads_choice,
    WAIT_ENV: wait_choice,
    EARLY_ENV: early_choice,
    attention.Q_LOAD_ENV: attention.q_load_choice,
    mxfp4.ORDER_ENV: mxfp4.order_choice,
}
# what every switch was before it existed: the settings of traces that record none
HISTORICAL = {linear_fused.BODY_ENV: "fused", moe.BODY_ENV: "mainloop", moe.TOPK_ENV: "task", PIN_ENV: "none",
              ROWS_ENV: "global", common.PROBES_ENV: "off", linear_tiling.TILES_ENV: "split",
              QUIET_ENV: "none", linear_fused.NORM_STATS_ENV: "global", moe.LOADS_ENV: "thread",
              WAIT_ENV: "warp", EARLY_ENV: "0",
              attention.Q_LOAD_ENV: "copy", mxfp4.ORDER_ENV: "published"}  # fmt: skip


def completed(recorded: Mapping[str, str]) -> dict[str, str]:
    """A record of switches with every switch it lacks at its HISTORICAL value (a switch added after
    the record was written was then at that value)."""
    return {**HISTORICAL, **recorded}


def current() -> dict[str, str]:
    """The value of every switch in force now (the defaults where unset)."""
    return {name: read() for name, read in SWITCHES.items()}


@contextlib.contextmanager
def applied(env: Mapping[str, str]) -> Iterator[None]:
    """Set `env` (switch -> value) for the with-block; each value is checked by its reader."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for k in env:
            if k in SWITCHES:
                SWITCHES[k]()
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
