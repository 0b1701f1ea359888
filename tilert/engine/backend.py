"""Step backends: what the decode loop needs from a runtime.

A backend runs the target's step graph (B tokens at given positions, optionally with DFlash
acceptance) and the drafter's graph. The reference backend interprets graphs on the CPU; GPU
runtimes implement the same two methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from tilert.checkpoint.sharded import RankWeights
from tilert.engine.memory import state_bytes
from tilert.ir.graph import Graph
from tilert.models.binding import bind_param, bind_params
from tilert.models.builder import build_step_graph
from tilert.models.config import ModelConfig
from tilert.models.drafter import build_drafter_graph
from tilert.ops.attention import check_slots
from tilert.passes import shard_for_ranks
from tilert.runtime.reference import ReferenceExecutor


class StepBackend(Protocol):
    cfg: ModelConfig
    max_seq: int

    def target_step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str = "decode") -> dict[str, Any]:
        """Outputs: logits [B, V], next_tokens i32[B], features [B, F] (if a drafter), accept i32[B+1] (verify).
        The integer outputs are host tensors; the persistent backend's logits and features stay on its device."""
        ...

    def draft_step(
        self,
        block_tokens: torch.Tensor,
        block_positions: torch.Tensor,
        ctx_features: torch.Tensor,
        ctx_positions: torch.Tensor,
    ) -> torch.Tensor:
        """The drafted block i32[B] (anchor first)."""
        ...

    def reset(self) -> None: ...


PREFILL_CHUNK = 16  # rows of a GPU prefill step: the most the MoE and LM-head bodies take at once
# the mixed-sequence step shapes (rows) a GPU backend compiles: every row count up to a prefill chunk
BATCH_ROWS = tuple(range(1, PREFILL_CHUNK + 1))


def prefill_plan(n: int, start: int, max_seq: int, chunk: int) -> list[tuple[int, int, int]]:
    """How a GPU backend runs a prompt of n tokens at positions start.. as steps of compiled shapes:
    (offset, real rows, step rows) per step. Every step has `chunk` rows or 1: a short last chunk is
    padded with rows at the positions after it (their KV entries lie past the prompt, where later
    steps overwrite them, as with rejected drafts), or, where that padding would run past the cache
    (max_seq), its rows go one by one. So any prompt length runs on two compiled step shapes."""
    if n < 1:
        raise ValueError(f"a prefill needs at least one token, got {n}")
    steps, i = [], 0
    while i < n:
        rest = n - i
        if rest >= chunk:
            steps.append((i, chunk, chunk))
            i += chunk
        elif rest > 1 and start + i + chunk <= max_seq:
            steps.append((i, rest, chunk))
            i += rest
        else:
            steps.append((i, 1, 1))
            i += 1
    return steps


def request_shapes(n: int, max_seq: int, block: int | None, chunk: int = PREFILL_CHUNK) -> set[tuple[int, str]]:
    """The (tokens, mode) step shapes a request with an n-token prompt makes a GPU backend compile:
    its prefill steps, a decode step, and with a DFlash block size the verify step."""
    shapes = {(rows, "decode") for _, _, rows in prefill_plan(n, 0, max_seq, chunk)} | {(1, "decode")}
    return shapes | ({(block, "verify")} if block else set())


class GraphBackend:
    """What every runtime's backend shares: the step graphs per shape, built (and prepared) once.

    Subclasses say how a built graph is prepared (`_prepare`: shard/compile and bind weights) and
    run (`_execute`: one step, outputs of the first rank). `prefill_chunk` (GPU backends): a
    multi-token decode step (a prefill) runs as steps of that many rows (`prefill_plan`), so every
    prompt length uses the same compiled shapes; None runs it as one step of any size.
    """

    prefill_chunk: int | None = None
    kv_element_bytes = 2  # GPU runtimes keep KV caches in bf16
    batch_rows: tuple[int, ...] = BATCH_ROWS  # mixed-step shapes: a step's rows are padded to the next one
    pool_slots: int | None = None  # sequence slots of the mixed steps' KV cache pool (open_pool)

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], max_seq: int) -> None:
        self.cfg, self.weights, self.max_seq = cfg, weights, max_seq
        self._prepared: dict[tuple, Any] = {}

    def kv_bytes_per_sequence(self) -> int:
        """Bytes of one sequence's KV caches in this process: the state values of the target and
        drafter graphs (a backend that runs one rank of `world`, i.e. has a `rank`, holds 1/world)."""
        graphs = {"target": build_step_graph(self.cfg, tokens=1, max_seq=self.max_seq)}
        if self.cfg.dflash is not None:
            graphs["drafter"] = build_drafter_graph(self.cfg, context=1, max_seq=self.max_seq)
        total = state_bytes(graphs, self.kv_element_bytes)
        return total // max(1, getattr(self, "world", 1)) if hasattr(self, "rank") else total

    def _prepare(self, g: Graph) -> Any:
        raise NotImplementedError

    def _execute(self, prepared: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def _execute_async(self, prepared: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """`_execute` without a host synchronisation where the runtime can (outputs stay where they
        were computed; errors surface at `finish_async`). Here: `_execute` itself."""
        return self._execute(prepared, inputs)

    def finish_async(self) -> None:
        """Wait for the steps `verify_async` / `draft_async` enqueued and raise their errors."""

    def _device_params(self, params: Mapping[str, Any], device: Any) -> dict[str, Any]:
        """The bound params on `device`, one copy per name for every step graph of this backend.
        A name binds the same checkpoint tensor in every graph (the drafter's embedding and LM head
        are the target's), so a second graph must not replace the first one's copy: that copy may
        be what an earlier captured CUDA graph reads, and freeing it leaves the graph reading
        reused memory; and a copy per step shape would multiply the weights' GPU memory."""
        cache = self.__dict__.setdefault("_param_copies", {})
        for k, v in params.items():
            if k not in cache:
                cache[k] = v.to(device)
        return {k: cache[k] for k in params}

    def _get(self, key: tuple, build: Any) -> Any:
        if key not in self._prepared:
            self._prepared[key] = self._prepare(build())
        return self._prepared[key]

    def target_step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str = "decode") -> dict[str, Any]:
        B = int(tokens.shape[0])
        chunk = self.prefill_chunk
        if mode == "decode" and chunk and B > 1 and B != chunk:
            return self._prefill(tokens, positions, chunk)
        return self._step(tokens, positions, mode)

    def _prefill(self, tokens: torch.Tensor, positions: torch.Tensor, chunk: int) -> dict[str, Any]:
        """A multi-token decode step as prefill_plan's steps; outputs of the real rows, concatenated."""
        pos = positions.to(torch.int32)
        if not bool((pos[1:] - pos[:-1] == 1).all()):
            raise ValueError("a prefill's positions must be consecutive")
        outs: dict[str, list[torch.Tensor]] = {}
        for off, real, rows in prefill_plan(int(tokens.shape[0]), int(pos[0]), self.max_seq, chunk):
            t = tokens[off : off + real]
            if rows > real:  # padding rows: copies of the last token at the positions after it
                t = torch.cat([t, t[-1:].expand(rows - real)])
            out = self._step(t, pos[off] + torch.arange(rows, dtype=torch.int32), "decode")
            for k, v in out.items():
                outs.setdefault(k, []).append(v[:real].clone())  # a replayed graph reuses its outputs
        return {k: torch.cat(v) for k, v in outs.items()}

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str, run: Any = None) -> dict[str, Any]:
        B = int(tokens.shape[0])
        prepared = self._get(
            ("target", B, mode), lambda: build_step_graph(self.cfg, tokens=B, max_seq=self.max_seq, mode=mode)
        )
        inputs = {"tokens": tokens.to(torch.int32), "positions": positions.to(torch.int32)}
        return (run or self._execute)(prepared, inputs)

    def decode_async(self, tokens: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        """A one-row decode step enqueued as `verify_async` enqueues a verify step."""
        return self._step(tokens, positions, "decode", self._execute_async)

    def verify_async(self, tokens: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
        """A verify step as `target_step(..., "verify")`, enqueued without a host synchronisation
        where the runtime can: its inputs may be device tensors (the previous step's outputs) and
        its outputs stay on the device (engine/cycles.py chains DFlash cycles this way)."""
        return self._step(tokens, positions, "verify", self._execute_async)

    # ---- mixed-sequence steps (continuous batching) --------------------------------------------

    def open_pool(self, slots: int) -> None:
        """Run mixed steps over a pool of `slots` sequence slots: stacked KV caches [slots + 1, Hkv,
        max_seq, D] (the last slot is scratch: padding rows write there and nowhere else), apart from
        the per-sequence caches of `target_step` and `draft_step`."""
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"a KV cache pool needs at least one slot, got {slots!r}")
        if self.pool_slots not in (None, slots):
            raise ValueError(f"the KV cache pool already has {self.pool_slots} slots")
        self.pool_slots = slots

    def padded_rows(self, rows: int) -> int:
        """The compiled mixed-step shape that takes `rows` rows: the smallest of `batch_rows` >= rows."""
        for b in self.batch_rows:
            if b >= rows:
                return b
        raise ValueError(f"a mixed step of {rows} rows exceeds the largest step shape ({self.batch_rows[-1]} rows)")

    def mixed_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> dict[str, Any]:
        """One step over the rows of several sequences: row i is token tokens[i] of the sequence in
        pool slot slots[i] at positions[i] (a sequence's rows contiguous at consecutive positions: a
        decode row, a DFlash block, a prefill chunk). The rows are padded to the next compiled shape
        with rows in the scratch slot, which change no sequence's cache or results. Returns the
        decode-mode outputs (logits, next_tokens, features) of the real rows."""
        if self.pool_slots is None:
            raise ValueError("mixed steps need a KV cache pool: call open_pool(slots) first")
        rows = int(tokens.shape[0])
        if rows < 1 or positions.shape != tokens.shape or slots.shape != tokens.shape:
            raise ValueError(f"a mixed step needs tokens, positions and slots of one length >= 1, got {rows}")
        check_slots(positions, slots, self.pool_slots, self.max_seq)
        B = self.padded_rows(rows)
        pad = B - rows  # padding rows: token 0 at positions 0.. of the scratch slot
        i32 = torch.int32
        inputs = {
            "tokens": torch.cat([tokens.to(i32), torch.zeros(pad, dtype=i32)]),
            "positions": torch.cat([positions.to(i32), torch.arange(pad, dtype=i32)]),
            "slots": torch.cat([slots.to(i32), torch.full((pad,), self.pool_slots, dtype=i32)]),
        }
        slots_n = self.pool_slots + 1
        prepared = self._get(
            ("mixed", B, slots_n),
            lambda: build_step_graph(self.cfg, tokens=B, max_seq=self.max_seq, mode="decode", slots=slots_n),
        )
        out = self._execute_pool(prepared, inputs)
        return {k: v[:rows] for k, v in out.items()}

    def _execute_pool(self, prepared: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One mixed step of a prepared graph on the pool's KV caches (a runtime whose per-sequence
        caches are swapped in keeps the pool apart)."""
        return self._execute(prepared, inputs)

    def draft_step(
        self,
        block_tokens: torch.Tensor,
        block_positions: torch.Tensor,
        ctx_features: torch.Tensor,
        ctx_positions: torch.Tensor,
    ) -> torch.Tensor:
        return self._draft(block_tokens, block_positions, ctx_features, ctx_positions, self._execute)

    def draft_async(
        self,
        block_tokens: torch.Tensor,
        block_positions: torch.Tensor,
        ctx_features: torch.Tensor,
        ctx_positions: torch.Tensor,
    ) -> torch.Tensor:
        """`draft_step` enqueued without a host synchronisation where the runtime can (as verify_async)."""
        return self._draft(block_tokens, block_positions, ctx_features, ctx_positions, self._execute_async)

    def _draft(self, block_tokens: torch.Tensor, block_positions: torch.Tensor, ctx_features: torch.Tensor,
               ctx_positions: torch.Tensor, run: Any) -> torch.Tensor:  # fmt: skip
        C = int(ctx_features.shape[0])
        prepared = self._get(("drafter", C), lambda: build_drafter_graph(self.cfg, context=C, max_seq=self.max_seq))
        inputs = {
            "block_tokens": block_tokens.to(torch.int32),
            "block_positions": block_positions.to(torch.int32),
            "ctx_features": ctx_features,
            "ctx_positions": ctx_positions.to(torch.int32),
        }
        return run(prepared, inputs)["draft"]


class ReferenceBackend(GraphBackend):
    """Runs step graphs on the reference executor; `world` > 1 runs sharded rank graphs in lockstep."""

    kv_element_bytes = 4  # the reference executor keeps state in float32
    # any row count runs; a few shapes keep the number of prepared graphs small
    batch_rows = (*BATCH_ROWS, 24, 32, 48, 64)

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        *,
        max_seq: int = 1024,
        world: int = 1,
        device: str = "cpu",
    ) -> None:
        super().__init__(cfg, weights, max_seq)
        self.world = world
        self.executor = ReferenceExecutor([{} for _ in range(world)], device=device)
        self.device = torch.device(device)
        # the mixed steps' KV cache pool: an executor of its own over the same params
        self.pool = ReferenceExecutor([{} for _ in range(world)], device=device)
        self.pool.params = self.executor.params

    def _prepare(self, g: Graph) -> list[Graph]:
        graphs = [g] if self.world == 1 else shard_for_ranks(g, self.world)
        self._bind(graphs)
        return graphs

    def _bind(self, graphs: list[Graph]) -> None:
        for r, gr in enumerate(graphs):
            bind_params(gr, self.weights, self.executor.params[r])

    def _execute(self, graphs: list[Graph], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.executor.run(graphs, inputs)[0]

    def _execute_pool(self, graphs: list[Graph], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.pool.run(graphs, inputs)[0]

    def reset(self) -> None:
        self.executor.reset()
        self.pool.reset()


class ShardedReferenceBackend(ReferenceBackend):
    """The reference backend over a sharded checkpoint (`tilert quantize` output): rank r binds only
    rank r's files, which hold exactly its slices."""

    def __init__(self, cfg: ModelConfig, weights: RankWeights, *, max_seq: int = 1024, device: str = "cpu") -> None:
        super().__init__(cfg, {}, max_seq=max_seq, world=weights.world, device=device)
        self.rank_weights = weights

    def _bind(self, graphs: list[Graph]) -> None:
        for r, gr in enumerate(graphs):
            params = self.executor.params[r]
            for v in gr.by_role("param"):
                if v.name not in params:
                    params[v.name] = bind_param(self.rank_weights.unsliced(r, v), self.rank_weights[r])
