"""KV cache memory policy: fixed-size cache slots, counted against a budget at start.

Step graphs and kernels are built for one cache capacity (`max_seq` is a shape of the plan), so a
sequence's KV cache is a slot of that size; it cannot shrink to a request's prompt + max_tokens.
What the Engine controls is how many slots can be live at once (`max_active`). At construction
it checks that max_active slots fit the KV memory budget and refuses, naming the numbers, when
they do not, so a server never starts in a state where every request would fail. The budget is
`kv_memory` bytes when given; otherwise 80% of the host's available memory (CPU) or 90% of the
device's free memory less the weights still to be copied there (GPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CPU_FRACTION = 0.8
GPU_FRACTION = 0.9
GiB = 1 << 30


class KVMemoryError(ValueError):
    """max_seq x max_active KV cache slots do not fit the memory budget."""


def kv_bytes_per_sequence(backend: Any) -> int | None:
    """Bytes of one sequence's KV caches (target + drafter) on this backend, if it can say."""
    fn = getattr(backend, "kv_bytes_per_sequence", None)
    return int(fn()) if callable(fn) else None


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget(device: str, weights: Any = None) -> tuple[int, str]:
    """(bytes, where it comes from) for the KV caches when no explicit budget is given."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        pending = _host_tensor_bytes(weights)
        return max(0, int(free * GPU_FRACTION) - pending), (
            f"{GPU_FRACTION:.0%} of free GPU memory {free / GiB:.2f} GiB less {pending / GiB:.2f} GiB of weights; "
            "set it with kv_memory / --kv-cache-gb"
        )
    avail = host_available_bytes()
    return int(avail * CPU_FRACTION), (
        f"{CPU_FRACTION:.0%} of available host memory {avail / GiB:.2f} GiB; set it with kv_memory / --kv-cache-gb"
    )


def _host_tensor_bytes(weights: Any) -> int:
    """Bytes of a plain dict of host tensors (weights the GPU backend will copy over); 0 otherwise."""
    if type(weights) is not dict:
        return 0
    total = 0
    for t in weights.values():
        if hasattr(t, "device") and getattr(t.device, "type", "cpu") != "cuda":
            total += int(t.numel() * t.element_size())
    return total


def check_kv_memory(per_sequence: int, slots: int, max_seq: int, budget: int, source: str) -> None:
    """Raise KVMemoryError (one line, the numbers in it) when `slots` caches of max_seq tokens do not fit."""
    need = per_sequence * slots
    if need <= budget:
        return
    fit = budget // per_sequence if per_sequence else 0
    per_token = per_sequence / max_seq
    longest = int(budget // (per_token * slots)) if per_token else 0
    hint = f"at most {fit} concurrent sequences fit (--max-active)" if fit else "not even one sequence fits"
    raise KVMemoryError(
        f"KV cache does not fit: max_seq={max_seq} x max_active={slots} needs {need / GiB:.2f} GiB "
        f"({per_sequence / GiB:.3f} GiB per sequence), budget {budget / GiB:.2f} GiB ({source}); {hint}, "
        f"or max_seq <= {longest} at max_active={slots}"
    )


def state_bytes(graphs: Mapping[str, Any], element_bytes: int) -> int:
    """Bytes of the state values (KV caches) of the given graphs at element_bytes per element."""
    total = 0
    for g in graphs.values():
        for v in g.by_role("state"):
            n = 1
            for d in v.shape:
                n *= int(d)
            total += n * element_bytes
    return total
