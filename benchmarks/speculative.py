"""Speculative decoding: what a DFlash verify step costs against a plain decode step, and tokens/s
per user against the acceptance length.

Three parts (`--parts`, default all):
1. Full scale (rank 0 of an 8-rank mimo-v2.5-pro plan on one GPU, solo collectives, synthetic
   weights): eager + CUDA-graph step time for B = 1, 8, 16 and the drafter pass; tokens/s per
   user for acceptance lengths 1..B = L / (verify_B + drafter), against plain greedy 1 / decode_1.
2. The real loop on the GPU with the oracle drafter (tiny model, SYNTHETIC drafts): the measured
   mean acceptance length tracks the chosen one, and the output equals greedy decoding.
3. `loop`: tokens/s per user measured from the decode loop at full scale: rank 0's shard on one
   GPU (solo collectives, synthetic weights, routing by token), the persistent backend, greedy and
   DFlash with the oracle drafter at the chosen acceptance lengths (SYNTHETIC drafts), `--new-tokens`
   each; per run the loop's measured tokens/s beside the projection from the same run's step times
   and the host's share of the loop (tilert/engine/timing.py), and whether DFlash equalled greedy.
Writes benchmarks/results/speculative-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    time_step,  # noqa: E402
    write_result,  # noqa: E402
)
from benchmarks.e2e import bench_drafter  # noqa: E402
from tilert.engine import OracleDrafter, generate  # noqa: E402
from tilert.engine.eager import (
    EagerBackend,  # noqa: E402
    compile_for_gpu,  # noqa: E402
)
from tilert.engine.persistent import PersistentBackend, compile_step  # noqa: E402
from tilert.models.builder import build_step_graph  # noqa: E402
from tilert.models.config import load_config  # noqa: E402
from tilert.models.weights import synthetic_weights  # noqa: E402
from tilert.ops.sampling import dflash_accept  # noqa: E402
from tilert.runtime.eager.runtime import EagerRuntime  # noqa: E402
from tilert.runtime.eager.synthetic import synthetic_params  # noqa: E402
from tilert.runtime.persistent.step import PersistentStep  # noqa: E402


def full_scale(model: str, world: int, context: int, blocks: list[int]) -> dict:
    cfg = load_config(model)
    max_seq = context + 64
    params: dict = {}
    steps = {}
    for B in blocks:
        mode = "verify" if B > 1 else "decode"
        g = compile_for_gpu(build_step_graph(cfg, tokens=B, max_seq=max_seq, mode=mode), max_seq, world)[0]
        params = params or synthetic_params(g, seed=0)  # every step graph binds the same weights
        rt = EagerRuntime(params, world=world, solo=True)
        inputs = {
            "tokens": torch.randint(0, cfg.vocab_size, (B,), dtype=torch.int32, device="cuda"),
            "positions": torch.arange(context, context + B, dtype=torch.int32, device="cuda"),
        }
        rt.run(g, inputs)
        steps[B] = time_step(rt, g, inputs)[1]
        print(f"B={B}: {steps[B]:.3f} ms (eager + CUDA graph)", flush=True)
    draft_ms = bench_drafter(cfg, argparse.Namespace(world_size=world, context=context), max_seq)["eager_graph_ms"]
    greedy = 1e3 / steps[1]
    curve = {}
    for B in blocks:
        if B > 1 and steps[B] and draft_ms:
            curve[B] = {f"{L:g}": L * 1e3 / (steps[B] + draft_ms) for L in [1, 2, 3, 4, 5, 6, 6.3, 7, 8, B] if L <= B}
    return {
        "model": model,
        "world_size": world,
        "context": context,
        "step_ms": steps,
        "drafter_ms": draft_ms,
        "verify_over_decode": {B: steps[B] / steps[1] for B in blocks},
        "greedy_tokens_per_s": greedy,
        "dflash_tokens_per_s_by_accept_len": curve,
        "note": "tokens/s = accept_len / (verify_B + drafter), measured eager + CUDA-graph steps of rank 0",
    }


def oracle_loop(accept_lens: list[float], new_tokens: int = 64) -> list[dict]:
    """The real draft/verify/accept loop on the GPU with the oracle drafter (synthetic drafts)."""
    cfg = load_config("tiny")
    be = EagerBackend(cfg, synthetic_weights(cfg, 0), max_seq=256)
    prompt = [3, 1, 4, 1, 5]
    greedy = generate(be, prompt, new_tokens).tokens
    rows = []
    B = cfg.dflash.block_size
    for L in accept_lens:
        p = OracleDrafter.corruption_for_acceptance(min(L, B), B)
        od = OracleDrafter(greedy, len(prompt), p, cfg.vocab_size, B, seed=7)
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = generate(be, prompt, new_tokens, speculative="dflash", drafter=od)
        dt = time.perf_counter() - t
        rows.append(
            {
                "target_accept_len": L,
                "corruption_p": p,
                "measured_accept_len": res.mean_acceptance_length,
                "steps": res.steps,
                "lossless": res.tokens == greedy,
                "tokens_per_s_wall": len(res.tokens) / dt,
                "synthetic": res.synthetic,
            }
        )
        print(f"oracle L={L}: measured {res.mean_acceptance_length:.2f}, lossless {res.tokens == greedy}", flush=True)
    return rows


class SetAcceptanceSteps:
    """A backend mixin (before the backend class): with `set_acceptance` set, its drafter's drafts and
    its verify steps' acceptance go through that SetAcceptance, on the host-driven and the chained
    paths alike."""

    set_acceptance: SetAcceptance | None = None

    def target_step(self, tokens, positions, mode="decode"):
        out = super().target_step(tokens, positions, mode)
        if mode != "verify" or self.set_acceptance is None:
            return out
        return {**out, "accept": self.set_acceptance.accept(tokens, positions, out["next_tokens"])}

    def verify_async(self, tokens, positions):
        out = super().verify_async(tokens, positions)
        if self.set_acceptance is None:
            return out
        return {**out, "accept": self.set_acceptance.accept(tokens, positions, out["next_tokens"])}

    def draft_step(self, block_tokens, block_positions, ctx_features, ctx_positions):
        drafted = super().draft_step(block_tokens, block_positions, ctx_features, ctx_positions)
        return drafted if self.set_acceptance is None else self.set_acceptance.drafts(drafted, block_positions)

    def draft_async(self, block_tokens, block_positions, ctx_features, ctx_positions):
        drafted = super().draft_async(block_tokens, block_positions, ctx_features, ctx_positions)
        return drafted if self.set_acceptance is None else self.set_acceptance.drafts(drafted, block_positions)


class SoloRankBackend(SetAcceptanceSteps, PersistentBackend):
    """Rank 0 of a `plan_world`-rank plan on one GPU, collectives solo, synthetic weights (each
    name generated once for every step shape): the stand-in for one GPU of the node that
    benchmarks/e2e.py times. Drafts come from an oracle drafter, or from the model's drafter on
    synthetic weights (a persistent program over its own caches, as benchmarks/e2e.py's drafter)."""

    def __init__(self, cfg, *, plan_world: int, max_seq: int, device: str = "cuda", seed: int = 0) -> None:
        super().__init__(cfg, {}, max_seq=max_seq, device=device)
        self.plan_world, self.seed = plan_world, seed

    def _prepare(self, g):
        drafter = g.meta.get("kind") == "drafter"
        rg, sched = compile_step(g, self.max_seq, world=self.plan_world, sms=self.sms)
        cache = self.__dict__.setdefault("_param_copies", {})
        cache.update(synthetic_params(rg, seed=self.seed, device=self.device, skip=cache.keys()))
        params = {v.name: cache[v.name] for v in rg.by_role("param")}
        states = self.drafter_states if drafter else self.states
        step = PersistentStep(rg, sched.table, sched.counter_expected, params, self.device, states=states,
                              num_sms=self.sms)  # fmt: skip
        if drafter:
            return ("drafter", step)
        step.use_states(self.states)
        return ("persistent", step)


class SetAcceptance:
    """Benchmark-only: DFlash at a set acceptance on synthetic weights, every step in full. The
    model's drafter runs (its cost is paid), then its drafts are replaced by the oracle's (the
    greedy reference `truth`, each token corrupted with probability `corrupt_p`, drawn once per
    position); a verify step keeps the leading drafts that equal the reference, then the target's
    own token. So the acceptance is the oracle's whatever near-ties the synthetic weights' argmax
    meets (their B=1 and B=8 steps round differently, and a greedy reference stops matching the
    target after the first such tie). Device tensor ops only: chained cycles stay free of host
    synchronisations. The tokens are SYNTHETIC. As OracleDrafter counts them, block row i of a
    block whose anchor sits at position p is the reference's token p + i - prompt_len."""

    def __init__(self, truth: list[int], prompt_len: int, corrupt_p: float, vocab: int, seed: int = 7,
                 device: str = "cpu") -> None:  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        ref = torch.tensor(truth, dtype=torch.int64)
        hit = torch.rand(len(truth), generator=g) < corrupt_p
        other = (ref + 1 + torch.randint(0, vocab - 1, (len(truth),), generator=g)) % vocab
        self.ref = torch.cat([ref, torch.tensor([-1])]).to(torch.int32).to(device)  # -1: past the reference
        self.draft = torch.cat([torch.where(hit, other, ref), torch.tensor([0])]).to(torch.int32).to(device)
        self.prompt_len = prompt_len

    def _index(self, positions: torch.Tensor) -> torch.Tensor:
        k = positions.to(self.ref.device).long() - self.prompt_len
        return torch.where((k >= 0) & (k < len(self.ref) - 1), k, torch.full_like(k, len(self.ref) - 1))

    def drafts(self, drafted: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The block with rows 1.. replaced by the oracle's drafts at their positions."""
        d = drafted.to(self.ref.device, torch.int32)
        return torch.cat([d[:1], self.draft[self._index(positions[1:])]]).to(drafted.device)

    def accept(self, block: torch.Tensor, positions: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """The acceptance row (dflash_accept's form) keeping the leading drafts equal to the reference."""
        dev = next_tokens.device
        blk, nxt = block.to(dev, torch.int32), next_tokens.to(torch.int32)
        ref = self.ref[self._index(positions[1:])].to(dev)
        posterior = torch.cat([torch.where(blk[1:] == ref, blk[1:], nxt[:-1]), nxt[-1:]])
        return dflash_accept(blk, posterior)


def _loop_row(mode: str, target: float | None, p: float | None, res, **extra) -> dict:
    t = res.timing
    row = {"mode": mode, "target_accept_len": target, "corruption_p": p,
           "measured_accept_len": round(res.mean_acceptance_length, 4), "synthetic": True,
           "new_tokens": len(res.tokens), "tokens": res.tokens, **extra, **t}  # fmt: skip
    print(f"{mode} {extra or ''} L={target}: accept {res.mean_acceptance_length:.2f}, {t.get('tokens_per_s')} "
          f"tokens/s measured, {t.get('projected_tokens_per_s')} projected ({t.get('measured_over_projected')}), "
          f"host share {t.get('host_share')}", flush=True)  # fmt: skip
    return row


def loop_full_scale(model: str, world: int, accept_lens: list[float], new_tokens: int, prompt_len: int,
                    max_seq: int) -> dict:  # fmt: skip
    """Greedy, then DFlash with the oracle drafter at each acceptance length, on rank 0's shard."""
    cfg = load_config(model)
    be = SoloRankBackend(cfg, plan_world=world, max_seq=max_seq)
    gen = torch.Generator().manual_seed(1)
    prompt = [int(t) for t in torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen)]
    t0 = time.time()
    generate(be, prompt, 2)  # builds the steps and the weights (tens of GB) before anything is timed
    print(f"{model} rank 0 of {world}: steps and weights ready in {time.time() - t0:.0f} s", flush=True)
    greedy = generate(be, prompt, new_tokens)
    B = cfg.dflash.block_size
    # the verify step shape too (its program and kernel load cost seconds once), before a DFlash run is timed
    generate(be, prompt, 2 * B, speculative="dflash", drafter=OracleDrafter(greedy.tokens, len(prompt), 0.0,
                                                                            cfg.vocab_size, B, seed=7))
    generate(be, prompt, 2 * B, speculative="dflash")  # and the model drafter's programs
    print(f"verify and drafter steps ready in {time.time() - t0:.0f} s", flush=True)
    rows = [{"mode": "greedy", "new_tokens": len(greedy.tokens), **greedy.timing}]
    g = greedy.timing
    print(f"greedy: {g.get('tokens_per_s')} tokens/s (projected {g.get('projected_tokens_per_s')})", flush=True)
    chained = generate(be, prompt, new_tokens, cycles_per_sync=8)  # decode steps chained on the device
    g = chained.timing
    rows.append({"mode": "greedy", "cycles_per_sync": 8, "equals_host_driven": chained.tokens == greedy.tokens,
                 "new_tokens": len(chained.tokens), **g})  # fmt: skip
    print(f"greedy, 8 steps per sync: {g.get('tokens_per_s')} tokens/s (projected {g.get('projected_tokens_per_s')}), "
          f"host share {g.get('host_share')}", flush=True)  # fmt: skip
    for L in accept_lens:
        p = OracleDrafter.corruption_for_acceptance(min(L, B), B)
        od = OracleDrafter(greedy.tokens, len(prompt), p, cfg.vocab_size, B, seed=7)
        res = generate(be, prompt, new_tokens, speculative="dflash", drafter=od)
        rows.append(_loop_row("dflash, oracle drafter", L, p, res, lossless=res.tokens == greedy.tokens))
        be.set_acceptance = SetAcceptance(greedy.tokens, len(prompt), p, cfg.vocab_size, device=be.device)
        for chain in (1, 8):
            res = generate(be, prompt, new_tokens, speculative="dflash", cycles_per_sync=chain)
            rows.append(_loop_row("dflash, model drafter, set acceptance", L, p, res, cycles_per_sync=chain))
        be.set_acceptance = None
    # the model's drafter with the target's own acceptance (synthetic weights: its drafts rarely match)
    for chain in (1, 8):
        res = generate(be, prompt, new_tokens, speculative="dflash", cycles_per_sync=chain)
        rows.append(_loop_row("dflash, model drafter", None, None, res, cycles_per_sync=chain))
    own = [r["tokens"] for r in rows if r["mode"] == "dflash, model drafter"]
    rows[-1]["equals_host_driven"] = own[0] == own[1]
    for r in rows:
        r.pop("tokens", None)
    note = ("SYNTHETIC drafts and acceptance. 'dflash, oracle drafter': the oracle's drafts (no drafter step), "
            "kept where the target's argmax agrees (on synthetic weights it leaves the greedy reference at the "
            "first near-tie); 'dflash, model drafter, set acceptance': the model's drafter runs, its drafts are "
            "replaced by the oracle's and the verify keeps those equal to the reference (SetAcceptance), so the "
            "loop pays every step at the oracle's acceptance; 'dflash, model drafter': its own drafts and the "
            "target's acceptance; cycles_per_sync > 1: cycles chained on the device")
    return {"model": model, "world_size": world, "max_seq": max_seq, "prompt_len": prompt_len, "routing": "by token",
            "backend": "persistent (rank 0, solo collectives, synthetic weights)", "runs": rows,
            "synthetic_note": note}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mimo-v2.5-pro")
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--parts", default="steps,oracle,loop", help="comma-separated: steps, oracle, loop")
    ap.add_argument("--accept-lens", type=float, nargs="+", default=[6.3, 3.0], help="loop: oracle acceptance lengths")
    ap.add_argument("--new-tokens", type=int, default=256, help="loop: tokens per generation")
    ap.add_argument("--prompt-len", type=int, default=1, help="loop: prompt tokens (1: no prefill step shape)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    if parts - {"steps", "oracle", "loop"}:
        raise SystemExit(f"unknown --parts {sorted(parts - {'steps', 'oracle', 'loop'})} (steps, oracle, loop)")
    res: dict = {}
    if "steps" in parts:
        res["full_scale"] = full_scale(a.model, a.world_size, a.context, a.blocks)
    if "oracle" in parts:
        res["oracle_loop_tiny"] = oracle_loop([1.5, 2.5, 3.5, 4.0])
        res["synthetic_note"] = ("oracle_loop_tiny drafts are SYNTHETIC (oracle drafter): for throughput at a chosen "
                                 "acceptance length only")  # fmt: skip
    if "loop" in parts:  # max_seq as benchmarks/e2e.py's steps (context + 64): the same kernels
        res["loop_full_scale"] = loop_full_scale(a.model, a.world_size, a.accept_lens, a.new_tokens, a.prompt_len,
                                                 a.context + 64)  # fmt: skip
    print(write_result("speculative", res, a.out))


if __name__ == "__main__":
    main()
