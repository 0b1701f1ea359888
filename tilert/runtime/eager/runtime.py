"""Eager GPU runtime: runs compiled (fused) step graphs with one launch per fused op.

It interprets the graph like the reference executor, but on the GPU, with bf16 KV caches and
the task kinds' eager implementations (tilert/runtime/kinds/) in place of references where they
apply. A step can be captured
into a CUDA graph (`capture=True`) when every op in it is free of host synchronisation (the
kernel paths are; the reference fallbacks for attention and MoE are not, and capture then fails
with an error naming the op).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from tilert.ir.graph import Graph, IRError
from tilert.ir.registry import get_op
from tilert.runtime.eager.context import GpuContext
from tilert.runtime.kinds import eager_impl
from tilert.runtime.reference.executor import bind_env


class GraphCaptureError(RuntimeError):
    """A step could not be captured into a CUDA graph (an op synchronises with the host)."""


class EagerRuntime:
    """Params on the GPU, per-graph state (KV caches, bf16), optional CUDA-graph replay per graph.

    use_kernels=False runs every op as plain torch (the references on the GPU): the baseline an
    engineer would write without this compiler. `ctx` replaces the rank context (a DistContext from
    runtime/eager/distributed.py runs the collectives across processes); `state_dtype` is the KV
    caches' dtype (float32 matches the reference executor's state exactly)."""

    def __init__(
        self,
        params: Mapping[str, Any],
        *,
        device: str = "cuda",
        world: int = 1,
        rank: int = 0,
        solo: bool = False,
        use_kernels: bool = True,
        ctx: GpuContext | None = None,
        state_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.params = dict(params)
        self.device = torch.device(device)
        self.ctx = ctx if ctx is not None else GpuContext(rank, world, solo, kernels=use_kernels)
        self.state_dtype = state_dtype
        self.states: dict[str, torch.Tensor] = {}
        self._graphs: dict[str, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], dict[str, Any]]] = {}
        self.launches = 0

    def _state(self, g: Graph) -> None:
        for v in g.by_role("state"):
            if v.name not in self.states:
                self.states[v.name] = torch.zeros(v.shape, dtype=self.state_dtype, device=self.device)

    def reset(self) -> None:
        for t in self.states.values():
            t.zero_()

    def _execute(self, g: Graph, env: dict[str, Any], marks: list[Any] | None = None) -> None:
        for i, node in enumerate(g.nodes):
            fn = eager_impl(node.op) or get_op(node.op).reference
            if marks is not None:
                marks.append(None if isinstance(marks, _Recorder) else self._mark())
            try:
                outs = fn(self.ctx, *(env[x] for x in node.inputs), **node.a.kwargs())
            except KeyError as e:
                raise IRError(f"node {i} ({node.op}) in '{g.name}': value {e} was not provided") from None
            env.update(zip(node.outputs, outs))
        if marks is not None:
            marks.append(None if isinstance(marks, _Recorder) else self._mark())

    def _mark(self) -> Any:
        """A timing mark: a recorded CUDA event on the GPU, perf_counter on the CPU."""
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        return time.perf_counter()

    def node_times(self, g: Graph, inputs: Mapping[str, torch.Tensor], iters: int = 5) -> list[float]:
        """Median microseconds of each node over `iters` steps: the measured side of the profiler's
        roofline. On the GPU the step is captured into a CUDA graph with timing events between the
        nodes and replayed, so the figures are kernel time without Python's launch overhead (when
        the step cannot be captured, events between eager launches, which include that overhead;
        `self.timing` says which). On the CPU: wall time per node."""
        if self.device.type == "cuda":
            try:
                return self._graph_node_times(g, inputs, iters)
            except RuntimeError:
                torch.cuda.synchronize()
        self.timing = "eager launches" if self.device.type == "cuda" else "cpu wall time"
        runs = []
        for _ in range(iters + 1):  # the first run compiles kernels and warms caches
            marks: list[Any] = []
            self._execute(g, self._env(g, inputs), marks)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                runs.append([a.elapsed_time(b) * 1e3 for a, b in zip(marks, marks[1:])])
            else:
                runs.append([(b - a) * 1e6 for a, b in zip(marks, marks[1:])])
        return _median_cols(runs[1:])

    def _graph_node_times(self, g: Graph, inputs: Mapping[str, torch.Tensor], iters: int) -> list[float]:
        env = self._env(g, inputs)
        self._execute(g, dict(env))  # compiles kernels, allocates workspaces
        torch.cuda.synchronize()
        marks = [torch.cuda.Event(enable_timing=True, external=True) for _ in range(len(g.nodes) + 1)]
        it = iter(marks)
        cg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cg):
            self._execute(g, dict(env), _Recorder(it))
        runs = []
        for _ in range(iters + 1):
            cg.replay()
            torch.cuda.synchronize()
            runs.append([a.elapsed_time(b) * 1e3 for a, b in zip(marks, marks[1:])])
        self.timing = "CUDA graph replay"
        return _median_cols(runs[1:])

    def _env(self, g: Graph, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        self._state(g)
        env = bind_env(g, inputs, self.params, self.device)
        env.update({v.name: self.states[v.name] for v in g.by_role("state")})
        return env

    def run(self, g: Graph, inputs: Mapping[str, torch.Tensor], capture: bool = False) -> dict[str, Any]:
        """One step. With capture, the first call records a CUDA graph that later calls replay."""
        if not capture:
            env = self._env(g, inputs)
            self._execute(g, env)
            self.launches = len(g.nodes)
            return {o: env[o] for o in g.outputs}
        if g.name not in self._graphs:
            static = {k: torch.as_tensor(v, device=self.device).clone() for k, v in inputs.items()}
            env = self._env(g, static)
            self._execute(g, dict(env))  # warm-up: compiles kernels, allocates workspaces
            torch.cuda.synchronize()
            cg = torch.cuda.CUDAGraph()
            env = self._env(g, static)
            try:
                with torch.cuda.graph(cg):
                    self._execute(g, env)
            except RuntimeError as e:
                torch.cuda.synchronize()
                raise GraphCaptureError(
                    f"CUDA-graph capture of '{g.name}' failed (an op synchronises with the host; "
                    f"use capture=False): {e}"
                ) from None
            self._graphs[g.name] = (cg, static, {o: env[o] for o in g.outputs})
        cg, static, outs = self._graphs[g.name]
        for k, v in inputs.items():
            static[k].copy_(torch.as_tensor(v, device=self.device))
        cg.replay()
        self.launches = 1
        return outs


class _Recorder(list):
    """A marks list for _execute that records pre-made (graph-capturable) events instead."""

    def __init__(self, events: Any) -> None:
        super().__init__()
        self.events = events

    def append(self, _: Any) -> None:
        e = next(self.events)
        e.record()
        super().append(e)


def _median_cols(runs: list[list[float]]) -> list[float]:
    return [sorted(col)[len(col) // 2] for col in zip(*runs)]


def to_device(params: Mapping[str, Any], device: str = "cuda") -> dict[str, Any]:
    return {k: v.to(device) for k, v in params.items()}
