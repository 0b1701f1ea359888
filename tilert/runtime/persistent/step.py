"""The whole decode step as one persistent kernel: the compiler's task table run by one CTA per SM.

Inputs are what the compiler hands over for one rank: the compiled rank graph (fused nodes), its
task table (passes/schedule: opcode, node, tile coordinates, counter waits, signal per row) and
the counters' expected counts. Nothing is restacked: each graph node gets one row of device
addresses (the node table, `tilert/kernels/views.py`), its task kind's node program
(tilert/runtime/kinds/) gives its views, bodies and tensors, nodes with equal program keys share
one *node class*, and the kernel dispatches a row on (opcode, class of its node) to the class's
tile body, which builds typed views of the node's tensors from its address row.

One launch per step: inputs are copied into static buffers, the epoch (launch count) is bumped on
the device, the kernel runs the table (waits compare counters with expected x epoch, so counters
are never reset), and the host checks the error word only when it synchronises anyway
(`check()`); a wait past its bound raises the error flag and the kernel drains instead of hanging.
"""

# no `from __future__ import annotations`: TileLang evaluates the prim_func annotations
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tilert.abi import DEFAULT_TIMEOUT_NS, ERR_DRY, ERR_TIMEOUT, FIELD, OPCODE_NAMES, OPCODES, WAITS
from tilert.ir.graph import Graph
from tilert.kernels import switches
from tilert.kernels.common import (
    DEVICE_PRELUDE,
    PROBE_PRELUDE,
    PROBE_SLOTS,
    build,
    gated,
    is_gated,
    probes_choice,
    using_prelude,
    using_probes,
    using_unmerged_pool,
)
from tilert.kernels.views import PERSISTENT_THREADS, ViewSpec, make_views, pointer_row
from tilert.runtime.kinds import for_node, registered
from tilert.runtime.persistent.megakernel import (
    CTA_WAIT_PRELUDE,
    PERSISTENT_PASS_CONFIGS,
    PREFETCH_ROWS,
    ROWS_PRELUDE,
    PersistentError,
    if_chain,
    make_persistent_loop,
    raise_on_error,
)
from tilert.runtime.persistent.program import Bindings, NodeProgram, PeerGroup, enable_peer_access

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels


# the opcodes of the tasks that ask L2 for no weights while they run (their successor's region is
# left out of the prefetch table), by TILERT_PREFETCH_QUIET
QUIET_OPCODES = {"none": (), "experts": ("MOE_GATE_UP", "MOE_DOWN")}


# ---- the kernel -------------------------------------------------------------------------------------


def make_step_kernel(classes: Sequence[NodeProgram], num_sms: int, n_nodes: int, max_views: int,
                     timeout_ns: int | None = None) -> Any:  # fmt: skip
    """The persistent prim_func: (Tasks, NodeClass, Ptrs, Counters, Err, Epoch, Trace, Prefetch). Every
    body imports one prelude: DEVICE_PRELUDE, or the superset of it some classes need
    (NodeProgram.prelude; where classes need different ones, the one that extends all the others).
    The queue length and the counter count are runtime shapes: a kernel serves every table of its
    node classes (another schedule of the same step reuses it)."""
    preludes = {c.prelude for c in classes if c.prelude is not None}
    top = max(preludes, key=len, default=DEVICE_PRELUDE)
    if not all(top.startswith(p) for p in preludes):
        raise PersistentError(f"the step's bodies need {len(preludes)} different device preludes; a kernel takes one")
    rows = switches.rows_choice() == "shared"
    cta = rows and switches.wait_choice() == "cta"
    probes = probes_choice() == "on"
    src = top + (ROWS_PRELUDE if rows else "") + (CTA_WAIT_PRELUDE if cta else "") + (PROBE_PRELUDE if probes else "")
    # the bodies are constructed and TileLang expands them here; their keyed unmerged buffers (the
    # expert GEMVs' reduction buffers) are one per kernel
    with using_prelude(src), using_probes(probes), using_unmerged_pool():
        return _make_step_kernel(classes, num_sms, n_nodes, max_views, timeout_ns, rows, probes, cta)


def trace_columns(probes: bool | None = None) -> int:
    """Columns of a step's trace buffer: start, end, ready, and with probes (TILERT_PROBES=on) the
    bodies' PROBE_SLOTS phase stamps."""
    if probes is None:
        probes = probes_choice() == "on"
    return 3 + (PROBE_SLOTS if probes else 0)


def _make_step_kernel(classes: Sequence[NodeProgram], num_sms: int, n_nodes: int, max_views: int,
                      timeout_ns: int | None, rows: bool, probes: bool, cta: bool = False) -> Any:  # fmt: skip
    import tilelang.language as T

    max_tasks, n_counters = T.dynamic("max_tasks"), T.dynamic("n_counters")

    built = [c.bodies() for c in classes]
    by_opcode: dict[str, list[tuple[int, Any, list[ViewSpec]]]] = {}
    for k, (c, bodies) in enumerate(zip(classes, built)):
        for name, body in bodies.items():
            by_opcode.setdefault(name, []).append((k, body, c.specs))

    # bufs: (NodeClass, Ptrs), read from global memory by node; with rows in shared memory the loop
    # hands (rows, ptrs, b, Ptrs) instead: the task's row in shared memory (its node class in the
    # CLASS_FIELD column of the device table) and its node's pointers, which the threads after warp 0 copied into
    # shared memory while warp 0 waited (a gated body reads them before the wait: from Ptrs)
    def views_of(bufs: Any, op: Any, specs: list[ViewSpec], gate: bool = False) -> Any:
        if not rows:
            return make_views(bufs[1], op, specs)
        return make_views(bufs[3], op, specs) if gate else make_views(bufs[1], None, specs)

    def class_of(bufs: Any, op: Any) -> Any:
        return bufs[0][bufs[2], CLASS_FIELD] if rows else bufs[0][op]

    def opcode_body(cases: list[tuple[int, Any, list[ViewSpec]]]) -> Any:
        def case(k: int, body: Any, specs: list[ViewSpec]) -> tuple[Any, Any]:
            if is_gated(body):  # it waits for its inputs itself (megakernel.Gate)

                @T.macro
                def run_gate(bufs, op, c0, c1, c2, gate):
                    body(views_of(bufs, op, specs, gate=True), c0, c1, c2, gate)

                return k, gated(run_gate)

            @T.macro
            def run(bufs, op, c0, c1, c2):
                body(views_of(bufs, op, specs), c0, c1, c2)

            return k, run

        return if_chain([case(*c) for c in cases], selector=class_of, tree=rows)

    bodies = {name: opcode_body(cases) for name, cases in by_opcode.items()}
    bodies.setdefault("BARRIER", _noop())
    loop = make_persistent_loop(bodies, max_tasks=max_tasks, timeout_ns=timeout_ns or DEFAULT_TIMEOUT_NS,
                                prefetch=True, rows_smem=rows, views=max_views, probes=probes,
                                cta_wait=cta)  # fmt: skip

    @T.prim_func
    def tilert_step(
        Tasks: T.Tensor((num_sms, max_tasks, len(FIELD)), "int32"),
        NodeClass: T.Tensor((n_nodes,), "int32"),
        Ptrs: T.Tensor((n_nodes, max_views), T.ptr),
        Counters: T.Tensor((n_counters,), "int32"),
        Err: T.Tensor((4,), "int32"),
        Epoch: T.Tensor((1,), "int32"),
        Trace: T.Tensor((num_sms, max_tasks, trace_columns(probes)), "int64"),
        Prefetch: T.Tensor((num_sms, max_tasks, 4), "int64"),
    ):
        with T.Kernel(num_sms, threads=PERSISTENT_THREADS) as sm:
            # Never runs (epochs start at 1); its presence makes this a cooperative launch
            # (TileLang marks kernels that can grid-sync), and the driver then starts the kernel only
            # with every CTA resident at once, or refuses it: CTAs spin on each other's counters, so
            # one CTA left waiting for an SM another kernel holds would stall the step.
            if Epoch[0] < 0:
                T.sync_grid()
            loop(sm, Tasks, Counters, Err, Epoch, Trace, (NodeClass, Ptrs), Prefetch)

    return tilert_step


def _noop() -> Any:
    import tilelang.language as T

    @T.macro
    def nop(bufs, op, c0, c1, c2):
        T.evaluate(0)

    return nop


CLASS_FIELD = FIELD["cost_ns"]  # the device table's column that holds each task's node class


def with_node_classes(table: np.ndarray, node_class: Sequence[int]) -> np.ndarray:
    """A copy of a task table whose cost column (CLASS_FIELD) holds each task's node class: the
    loop with rows in shared memory dispatches on it (the cost is the compiler's estimate, which
    the kernel never reads; the host's table keeps it)."""
    tb = table.copy()
    live = tb[:, :, FIELD["opcode"]] != 0
    cls = np.asarray(node_class, np.int32)
    tb[:, :, CLASS_FIELD] = np.where(live, cls[np.where(live, tb[:, :, FIELD["op"]], 0)], 0)
    return tb


_STEP_KERNELS: dict[tuple, Any] = {}  # compiled step kernels of this process, by step_kernel_key


def step_kernel_key(classes: Sequence[NodeProgram], shape: tuple[int, int, int], out_dir: Any = None,
                    builder: Any = None) -> tuple:  # fmt: skip
    """What a step kernel's source follows from, its key in this process's kernels: its classes' keys
    and view specs (a view's shape is in the source: two KV pools of different slot counts, whose
    attention nodes have the same config, are two kernels: with the specs left out, a mixed step
    reused a smaller pool's kernel, whose cache loads are bounded by that pool's rows, and read the
    slots past them as zeros), its shape and every build switch."""
    return (tuple(c.key for c in classes), tuple(tuple(c.specs) for c in classes), shape,
            tuple(sorted(switches.current().items())), str(out_dir), builder)


class PersistentStep:
    """One rank's step graph as one persistent launch per step.

    graph: the compiled rank graph; table/expected: its schedule (int32 rows, counters' expected
    counts); params: the rank's bound weights on the GPU. `run(inputs)` enqueues one step and
    returns the graph outputs (device tensors, valid once the stream reaches them); `check()`
    raises if any launch so far hit a bounded wait or an unknown opcode.
    """

    def __init__(self, graph: Graph, table: np.ndarray, expected: np.ndarray, params: Mapping[str, Any],
                 device: str = "cuda", num_sms: int | None = None, out_dir: str | None = None,
                 states: dict[str, torch.Tensor] | None = None, group: PeerGroup | None = None,
                 rank: int = 0) -> None:  # fmt: skip
        self.g = graph
        self.device = torch.device(device)
        sms = num_sms or torch.cuda.get_device_properties(self.device).multi_processor_count
        if table.shape[0] > sms:
            raise PersistentError(f"the table has {table.shape[0]} SM queues; this GPU has {sms} SMs")
        self.sms = table.shape[0]
        b = self.bind = Bindings(graph, params, self.device, states, group=group, rank=rank)
        self.programs: list[NodeProgram] = []
        for i, n in enumerate(graph.nodes):
            if n.op not in registered():
                raise PersistentError(f"no persistent body for op kind '{n.op}' (node {i})")
            self.programs.append(for_node(n.op).program(graph, n, b, self.sms))
        self._check_table(table, expected)
        keys: dict[tuple, int] = {}
        classes: list[NodeProgram] = []
        node_class = []
        for p in self.programs:
            if p.key not in keys:
                keys[p.key] = len(classes)
                classes.append(p)
            node_class.append(keys[p.key])
        max_views = max(len(p.specs) for p in self.programs)
        ptrs = torch.zeros(len(self.programs), max_views, dtype=torch.int64)
        for i, p in enumerate(self.programs):
            ptrs[i, : len(p.specs)] = pointer_row(p.tensors, p.specs, f"node {i} ({graph.nodes[i].op})")[0]
        self.ptrs = ptrs.to(self.device)
        self._ptrs_host = ptrs
        self.classes = classes
        # where each KV cache sits in the node table, so another sequence's caches can be swapped in
        own = {name: t for name, t in b.states.items() if name in graph.values}
        self._state_slots = [(i, j, name) for name, t in own.items() for i, p in enumerate(self.programs)
                             for j, u in enumerate(p.tensors) if u is t]  # fmt: skip
        self.node_class = torch.tensor(node_class, dtype=torch.int32, device=self.device)
        self.table = np.ascontiguousarray(table)  # host copy (the profiler's and the tests' view)
        self.tasks = torch.from_numpy(with_node_classes(self._device_table(), node_class)).to(self.device)
        self.counters = torch.zeros(max(1, len(expected)), dtype=torch.int32, device=self.device)
        self.err = b.err
        self.trace = torch.zeros(self.sms, table.shape[1], trace_columns(), dtype=torch.int64, device=self.device)
        self.prefetch = torch.from_numpy(self._prefetch_table()).to(self.device)
        self.n_classes = len(classes)
        shape = (self.sms, len(self.programs), max_views)  # the table's length and counters are runtime shapes
        # built (traced) once per process: another backend, sequence or server worker with the same
        # step reuses it
        kernel_key = step_kernel_key(classes, shape, out_dir, build)
        if kernel_key not in _STEP_KERNELS:
            func = make_step_kernel(classes, *shape)
            kinds = ", ".join(sorted({n.op for n in graph.nodes}))
            what = f"persistent step of '{graph.name}' (node bodies: {kinds})"
            _STEP_KERNELS[kernel_key] = build(func, pass_configs=PERSISTENT_PASS_CONFIGS, out_dir=out_dir,
                                              name="tilert_step", what=what)  # fmt: skip
        self.kernel = _STEP_KERNELS[kernel_key]
        self.steps = 0
        self.launches_per_step = 1
        self.switches = switches.current()  # the build switches its program was built under (traces record them)

    def _prefetch_table(self) -> np.ndarray:
        """int64 [sms, tasks, 4]: each task's weight region (NodeProgram.prefetch), rows 0 if none,
        and 0 too where the task before it on its queue is quiet (TILERT_PREFETCH_QUIET: the loop
        asks L2 for the next task's region while a task waits and runs)."""
        tb = self.table
        pf = np.zeros((*tb.shape[:2], 4), dtype=np.int64)
        for s_, t_ in zip(*np.nonzero(tb[:, :, FIELD["opcode"]])):
            row = tb[s_, t_]
            p = self.programs[int(row[FIELD["op"]])]
            name = OPCODE_NAMES.get(int(row[FIELD["opcode"]]))
            r = p.prefetch(name, *(int(row[FIELD[c]]) for c in ("c0", "c1", "c2"))) if p.prefetch else None
            if r is not None:
                addr, nbytes, rows, stride = r
                if addr % 16 or nbytes % 16 or stride % 16:
                    raise PersistentError(f"node {int(row[FIELD['op']])} {name}: prefetch region {r} is not "
                                          f"16-byte aligned")  # fmt: skip
                pf[s_, t_] = (addr, nbytes, min(rows, PREFETCH_ROWS), stride)
        quiet = np.isin(tb[:, :-1, FIELD["opcode"]], [OPCODES[o] for o in QUIET_OPCODES[switches.prefetch_quiet()]])
        pf[:, 1:][quiet] = 0
        return pf

    def _device_table(self) -> np.ndarray:
        """The table as the kernel runs it: the table itself, but the rows of nodes whose program
        chains tasks (NodeProgram.chain) carry the coordinates it gives, from their runs of
        consecutive tasks of one node on one SM queue."""
        if not any(p.chain for p in self.programs):
            return self.table
        tb = self.table.copy()
        F, coords = FIELD, ("c0", "c1", "c2")
        for s_ in range(tb.shape[0]):
            run = 0
            for t_ in range(tb.shape[1]):
                row = self.table[s_, t_]
                op, code = int(row[F["op"]]), int(row[F["opcode"]])
                p = self.programs[op] if code and 0 <= op < len(self.programs) else None
                nxt = self.table[s_, t_ + 1] if t_ + 1 < tb.shape[1] else None
                linked = nxt is not None and int(nxt[F["opcode"]]) == code and int(nxt[F["op"]]) == op
                if p is not None and p.chain is not None:
                    c = tuple(int(row[F[k]]) for k in coords)
                    cn = tuple(int(nxt[F[k]]) for k in coords) if linked else None
                    for k, v in zip(coords, p.chain(OPCODE_NAMES[code], c, run, cn)):
                        tb[s_, t_, F[k]] = v
                run = run + 1 if linked and code else 0
        return tb

    def _check_table(self, table: np.ndarray, expected: np.ndarray) -> None:
        """Every row names a node of this graph with a body for its opcode; counters in range; an
        `exact` program's node has tasks of each of its opcodes."""
        ops, nodes = table[:, :, FIELD["opcode"]], table[:, :, FIELD["op"]]
        present: dict[int, set[str]] = {}
        for code, i in {(int(c), int(i)) for c, i in zip(ops[ops != 0].ravel(), nodes[ops != 0].ravel())}:
            name = OPCODE_NAMES.get(code, f"#{code}")
            if not 0 <= i < len(self.programs):
                raise PersistentError(f"task {name} names node {i}; the graph has {len(self.programs)}")
            if name != "BARRIER" and name not in self.programs[i].opcodes:
                raise PersistentError(f"task {name} on node {i} ({self.g.nodes[i].op}): its body has "
                                      f"{sorted(self.programs[i].opcodes)} (a table compiled under other "
                                      f"build switches?)")  # fmt: skip
            present.setdefault(i, set()).add(name)
        for i, p in enumerate(self.programs):
            missing = [o for o in p.opcodes if o not in present.get(i, set())]
            if p.exact and missing:
                raise PersistentError(f"node {i} ({self.g.nodes[i].op}): the table has no {', '.join(missing)} task, "
                                      f"which its program runs (a table compiled under other build switches?)")
        live = ops != 0
        gap = live[:, 1:] & ~live[:, :-1]  # a task after a NOP: the kernel's loop stops at the first NOP
        if gap.any():
            s_, k_ = (int(x) for x in np.argwhere(gap)[0])
            raise PersistentError(f"SM queue {s_} has a NOP at slot {k_} before a task; queues must be packed "
                                  f"(the persistent loop ends at a queue's first NOP)")  # fmt: skip
        sig = table[:, :, FIELD["signal"]]
        if sig.max(initial=-1) >= len(expected):
            raise PersistentError(f"a task signals counter {int(sig.max())}; the table has {len(expected)} counters")

    def launch(self, inputs: Mapping[str, Any]) -> None:
        """Copy inputs into the static buffers, bump the epoch and launch (no host sync)."""
        self.stage(inputs)
        self._enqueue()

    def stage(self, inputs: Mapping[str, Any]) -> None:
        """Copy inputs into the static buffers and bump the epoch: a launch without its kernel
        (MultiRankStep stages every rank before it launches any, so the ranks start together)."""
        for v in self.g.by_role("input"):
            if v.name not in inputs:
                raise ValueError(f"graph '{self.g.name}' needs input '{v.name}' ({v.dtype.name}{list(v.shape)})")
            t = torch.as_tensor(inputs[v.name])
            if tuple(t.shape) != v.shape:
                raise ValueError(f"input '{v.name}' has shape {list(t.shape)}, graph expects {list(v.shape)}")
            self.bind.env[v.name][: v.shape[0]].copy_(t, non_blocking=True)  # 2-D inputs are padded
        self.steps += 1
        self.bind.epoch.fill_(self.steps)

    def _enqueue(self) -> None:
        try:
            self.kernel(self.tasks, self.node_class, self.ptrs, self.counters, self.err, self.bind.epoch, self.trace,
                        self.prefetch)  # fmt: skip
        except Exception as e:  # the cooperative launch refuses a grid that cannot be resident at once
            msg = str(e).strip().splitlines()
            if any("COOPERATIVE" in m.upper() for m in msg):
                raise PersistentError(
                    f"the persistent step needs its {self.sms} CTAs (one per SM queue) resident at once, and this "
                    f"GPU cannot hold them together (another kernel's share of the SMs, an MPS or MIG limit, or "
                    f"a schedule for more SMs than the GPU has): {msg[-1] if msg else e}"
                ) from None
            if any("dynamic shared memory" in m for m in msg):  # a kernel cached without its resource file
                raise PersistentError(
                    f"the persistent step's kernel takes more shared memory than this GPU gives one CTA "
                    f"(a tiling or switch too large for it; TILERT_MOE_LOADS, TILERT_MOE_GEMV_TILING): "
                    f"{msg[-1]}") from None  # fmt: skip
            raise

    def preload(self) -> None:
        """One dry launch (the error word preset, so every task skips its waits and body), then the
        counters and the error word are cleared. It makes CUDA load the kernel now: under lazy module
        loading a first launch may wait for the device to go idle, which never happens while another
        rank's program spins on this one's arrivals (MultiRankStep preloads every rank)."""
        self.err.fill_(ERR_DRY)
        self._enqueue()
        torch.cuda.synchronize(self.device)
        self.err.zero_()
        self.counters.zero_()
        for t in self.bind.arrivals:
            t.zero_()

    def outputs(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.g.outputs:
            v = self.g.values[name]
            t = self.bind.env[name]
            out[name] = t[: v.shape[0]] if len(v.shape) == 2 else t
        return out

    def check(self) -> None:
        err = self.err.tolist()
        try:
            raise_on_error(err)
        except PersistentError as e:
            if err[0] != ERR_TIMEOUT or not 0 <= err[1] < self.sms:
                raise
            raise PersistentError(f"{e}: {self.describe_wait(err[1], err[2], err[3])}") from None

    def describe_wait(self, sm: int, slot: int, counter: int) -> str:
        """Which task waited on which counter for what count: a timed-out wait's report."""
        row = self.table[sm, slot]
        name = OPCODE_NAMES.get(int(row[FIELD["opcode"]]), f"#{int(row[FIELD['opcode']])}")
        node = int(row[FIELD["op"]])
        need = None
        for w in range(WAITS):
            first, count = int(row[FIELD[f"wait{w}_counter"]]), int(row[FIELD[f"wait{w}_count"]])
            if first >= 0 and first <= counter < first + max(count, 1):
                need = int(row[FIELD[f"wait{w}_expected"]]) * self.steps
        op = self.g.nodes[node].op if 0 <= node < len(self.g.nodes) else "?"
        where = ", ".join(f"{c}={int(row[FIELD[c]])}" for c in ("c0", "c1", "c2"))
        # (the counter's value now says nothing: after a timeout every CTA drains and still signals)
        return (f"task {name} of node {node} ({op}, {where}) waited for counter {counter} to reach {need} "
                f"(step {self.steps} of this program)")  # fmt: skip

    def run(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.launch(inputs)
        torch.cuda.synchronize(self.device)
        self.check()
        return self.outputs()

    def reset(self) -> None:
        for t in self.bind.states.values():
            t.zero_()

    def use_states(self, states: dict[str, torch.Tensor]) -> None:
        """Point the node table at another set of KV caches (another sequence's): tensors missing from
        `states` are created (zeros, same shape). One small host-to-device copy of the table."""
        for name, t in list(self.bind.states.items()):
            if name not in states:
                states[name] = torch.zeros_like(t)
        for i, j, name in self._state_slots:
            self._ptrs_host[i, j] = states[name].data_ptr()
            self.programs[i].tensors[j] = states[name]
        for name in self.bind.states:
            self.bind.env[name] = states[name]
        self.bind.states = states
        self.ptrs.copy_(self._ptrs_host)


class MultiRankStep:
    """The ranks of one step in one process: one persistent program per rank, each on its own CUDA
    stream so all are resident at once, exchanging through a PeerGroup (kernels/peer_collective.py).
    On one GPU (`device`) each rank is compiled for its share of the SMs (`compile_ranks`); with
    `devices` rank r runs on devices[r] with the whole GPU (`compile_ranks(..., gpus=world)`) and
    the collectives write the other GPUs' inboxes through peer access. Every rank gets the same
    inputs (SPMD), as with torchrun; `states[r]` are rank r's KV caches, shared by the programs of
    every step shape; `params[r]` must live on rank r's device."""

    def __init__(self, graphs: Sequence[Graph], schedules: Sequence[Any], params: Sequence[Mapping[str, Any]],
                 device: str = "cuda", states: Sequence[dict[str, torch.Tensor]] | None = None,
                 num_sms: int | None = None, devices: Sequence[str] | None = None) -> None:  # fmt: skip
        world = len(graphs)
        devs = [torch.device(d) for d in devices] if devices is not None else [torch.device(device)] * world
        if len(devs) != world:
            raise PersistentError(f"{len(devs)} devices for {world} ranks")
        for d in set(devs):
            total = sum(int(s.table.shape[0]) for s, dr in zip(schedules, devs) if dr == d)
            sms = num_sms or torch.cuda.get_device_properties(d).multi_processor_count
            if total > sms:
                n = devs.count(d)
                raise PersistentError(f"{n} ranks on {d} need {total} SM queues together; it has {sms} SMs "
                                      f"(compile each rank for {sms // n} SMs)")  # fmt: skip
        if devices is not None and devs[0].type == "cuda":
            enable_peer_access(devs)
        self.devices = devs
        self.group = PeerGroup(world, devs[0], devices=devs if devices is not None else None)
        states = states if states is not None else [{} for _ in range(world)]
        self.ranks = [PersistentStep(g, s.table, s.counter_expected, p, str(d), states=st, group=self.group, rank=r,
                                     num_sms=num_sms)
                      for r, (g, s, p, st, d) in enumerate(zip(graphs, schedules, params, states, devs))]  # fmt: skip
        self.multi_gpu = devices is not None
        self.streams = [torch.cuda.Stream(d) for d in devs] if devs[0].type == "cuda" else []
        if devs[0].type == "cuda":  # every rank's kernel loaded before any runs: they spin on each other
            for st in self.ranks:
                with self._on(st):
                    st.preload()

    def _on(self, st: PersistentStep) -> Any:
        """The rank's GPU as the current device (ranks on separate GPUs; a no-op on one GPU)."""
        return torch.cuda.device(st.device) if self.multi_gpu else contextlib.nullcontext()

    def launch(self, inputs: Mapping[str, Any]) -> None:
        """Enqueue one step on every rank (no host sync): a benchmark launches several, then syncs.
        Every rank's inputs are staged first and then the kernels launched back to back, so a
        rank's kernel does not wait for the next ranks' input copies: the ranks' kernels spin on
        each other's arrivals, and the first collective of a step absorbs their launch skew."""
        for st, stream in zip(self.ranks, self.streams):
            with self._on(st), torch.cuda.stream(stream):
                st.stage(inputs)
        for st, stream in zip(self.ranks, self.streams):
            with self._on(st), torch.cuda.stream(stream):
                st._enqueue()

    def synchronize(self) -> None:
        """Wait for every rank's GPU."""
        if self.multi_gpu:
            for d in dict.fromkeys(self.devices):
                torch.cuda.synchronize(d)
        else:
            torch.cuda.synchronize()

    def run(self, inputs: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        """One step on every rank (all launched before any is waited for); outputs per rank."""
        self.launch(inputs)
        self.synchronize()
        for r, st in enumerate(self.ranks):
            try:
                st.check()
            except RuntimeError as e:
                raise RuntimeError(f"rank {r}/{len(self.ranks)}: {e}") from None
        return [st.outputs() for st in self.ranks]
