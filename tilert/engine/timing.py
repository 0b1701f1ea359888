"""Where a generation's time goes: each backend step timed where it runs, and the loop's wall time.

Tokens per second per user is measured from the decode loop (every step after the prefill, host
work between steps included) and set beside the projection the step times alone give: mean
acceptance length / (verify step + drafter step) for DFlash, 1 / decode step for plain decoding.
The difference is what the host adds (`host_share`: the loop's wall time not covered by a step).

A step's time on a GPU backend is the GPU time between two CUDA events recorded around the
backend call on the current stream (read once the generation is over, so timing adds no host
synchronisation); on the CPU it is the call's wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("prefill", "decode", "verify", "draft")


def _cuda_device(backend: Any) -> torch.device | None:
    """The CUDA device a backend launches on (its own or its runtime's `device`), else None."""
    for owner in (backend, getattr(backend, "runtime", None)):
        dev = getattr(owner, "device", None)
        if dev is not None:
            dev = torch.device(dev)
            return dev if dev.type == "cuda" and torch.cuda.is_available() else None
    return None


@dataclass
class _Record:
    kind: str
    host_s: float
    events: tuple[Any, Any] | None = None

    def seconds(self) -> float:
        if self.events is None:
            return self.host_s
        a, b = self.events
        b.synchronize()
        return a.elapsed_time(b) * 1e-3


@dataclass
class StepClock:
    """Times the steps of one generation: `wrap(backend)` returns a backend whose target and draft
    steps are timed (the first target step is the prefill); `summary(result)` the figures."""

    records: list[_Record] = field(default_factory=list)
    start: float | None = None
    decode_start: float | None = None
    end: float | None = None
    _device: torch.device | None = None

    def wrap(self, backend: Any) -> _TimedBackend:
        self._device = _cuda_device(backend)
        return _TimedBackend(backend, self)

    def run(self, kind: str, fn: Any, *args: Any, **kw: Any) -> Any:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        if kind != "prefill" and self.decode_start is None:
            self.decode_start = now
        events = None
        if self._device is not None:
            stream = torch.cuda.current_stream(self._device)
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record(stream)
        out = fn(*args, **kw)
        if events is not None:
            events[1].record(torch.cuda.current_stream(self._device))
        self.end = time.perf_counter()
        self.records.append(_Record(kind, self.end - now, events))
        return out

    def finish(self) -> None:
        """The loop is over (its last step's result was read on the host)."""
        self.end = time.perf_counter()

    def summary(self, mean_acceptance_length: float, new_tokens: int) -> dict[str, Any]:
        """Step times per kind (ms), the decode loop's measured tokens/s per user, the projection
        from the step times, and the share of the loop's wall time the host adds."""
        secs: dict[str, list[float]] = {k: [] for k in KINDS}
        for r in self.records:
            secs[r.kind].append(r.seconds())
        steps = {k: {"n": len(v), "mean_ms": round(1e3 * sum(v) / len(v), 4)} for k, v in secs.items() if v}
        out: dict[str, Any] = {"steps": steps, "device_timed": self._device is not None}
        if self.start is not None and self.end is not None:
            out["wall_s"] = round(self.end - self.start, 6)
        if self.decode_start is None or self.end is None or self.end <= self.decode_start:
            return out
        loop_s = self.end - self.decode_start
        loop_tokens = new_tokens - 1  # the prefill's step gave the first token
        busy = sum(sum(secs[k]) for k in ("decode", "verify", "draft"))
        if secs["verify"]:
            per_cycle = (sum(secs["verify"]) + sum(secs["draft"])) / len(secs["verify"])
            projected = mean_acceptance_length / per_cycle
        elif secs["decode"]:
            projected = len(secs["decode"]) / sum(secs["decode"])
        else:
            return out
        measured = loop_tokens / loop_s
        out.update(
            decode_loop_s=round(loop_s, 6),
            tokens_per_s=round(measured, 3),
            projected_tokens_per_s=round(projected, 3),
            measured_over_projected=round(measured / projected, 4),
            host_share=round(max(0.0, 1.0 - busy / loop_s), 4),
        )
        return out


class _TimedBackend:
    """A backend whose target_step / draft_step go through a StepClock; anything else passes through."""

    def __init__(self, backend: Any, clock: StepClock) -> None:
        self._backend, self._clock, self._prefilled = backend, clock, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def target_step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str = "decode") -> dict[str, Any]:
        kind = mode if self._prefilled else "prefill"
        self._prefilled = True
        return self._clock.run(kind, self._backend.target_step, tokens, positions, mode)

    def draft_step(self, *args: Any, **kw: Any) -> torch.Tensor:
        return self._clock.run("draft", self._backend.draft_step, *args, **kw)

    def decode_async(self, tokens: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        self._prefilled = True
        return self._clock.run("decode", self._backend.decode_async, tokens, positions)

    def verify_async(self, tokens: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        self._prefilled = True
        return self._clock.run("verify", self._backend.verify_async, tokens, positions)

    def draft_async(self, *args: Any, **kw: Any) -> torch.Tensor:
        return self._clock.run("draft", self._backend.draft_async, *args, **kw)

    def reset(self) -> None:
        self._prefilled = False
        self._backend.reset()
