"""Several users in one step: continuous batching, measured.

Two modes:

    python benchmarks/batching.py load [--requests 200] [--concurrency 16] [--model tiny]
        The serving load test (CPU by default): an in-process `tilert serve` (reference backend),
        the same requests sent one at a time and then `--concurrency` at a time; prints both
        request rates and their ratio, and checks that every response equals the same request's
        response alone.

    python benchmarks/batching.py users [--model mimo-v2.5-pro] [--device cuda] [--world-size 8]
                                        [--users 1 2 4 8] [--context 4096] [--accept-len 6.3] [--out DIR]
        Rank 0's shard of an N-rank plan on one GPU (solo collectives, synthetic weights): the
        mixed step of U users' rows as one persistent launch, for plain decode (U rows) and DFlash
        verify (U blocks of the drafter's block size; steps of at most 16 rows), against the
        single-user steps; tokens/s per user and in total (DFlash: accept_len / (verify steps +
        one drafter pass per user), the oracle drafter's acceptance). Writes
        benchmarks/results/batching-<device>.json. With `--model tiny --device cpu` it runs the same
        code on the reference executor (a smoke test; timings meaningless).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import time_cuda, write_result  # noqa: E402
from tilert.engine.api import Engine  # noqa: E402
from tilert.engine.backend import BATCH_ROWS  # noqa: E402
from tilert.models.builder import build_step_graph  # noqa: E402
from tilert.models.config import load_config  # noqa: E402

# ---- the serving load test --------------------------------------------------------------------


def make_requests(n: int, vocab: int, max_tokens: int, seed: int = 0, dflash_every: int = 0) -> list[dict]:
    """n completion requests: random prompts of 4..16 ids, greedy, `max_tokens` each (every
    `dflash_every`-th one speculative, when > 0)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = {"prompt": [rng.randrange(vocab) for _ in range(rng.randint(4, 16))], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        if dflash_every and i % dflash_every == 0:
            body["speculative"] = "dflash"
        out.append(body)
    return out


def _post(host: str, port: int, body: dict, timeout: float) -> list[int]:
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        head = {"Content-Type": "application/json"}
        c.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers=head)
        r = c.getresponse()
        d = json.loads(r.read().decode())
    finally:
        c.close()
    if r.status != 200:
        raise RuntimeError(f"request failed with {r.status}: {d}")
    return d["choices"][0]["token_ids"]


def run_load(server: Any, bodies: list[dict], concurrency: int, timeout: float = 600.0) -> tuple[list, float]:
    """Send `bodies` with `concurrency` clients at once; (token ids per request, seconds)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(lambda b: _post(server.host, server.port, b, timeout), bodies))
    return outs, time.perf_counter() - t0


def load_test(requests: int = 200, concurrency: int = 16, model: str = "tiny", max_tokens: int = 16,
              max_active: int | None = None, seed: int = 0, dflash_every: int = 0,
              threads: int = 1) -> dict:  # fmt: skip
    """The load test: one in-process server, the requests one at a time, then `concurrency` at a time."""
    from tilert.serve.app import Server  # the serve extra

    torch.set_num_threads(threads)  # a tiny model: one intra-op thread avoids OpenMP spin contention
    with Engine(model, seed, max_seq=256, max_active=max_active or concurrency) as eng, Server(eng, port=0) as srv:
        bodies = make_requests(requests, eng.cfg.vocab_size, max_tokens, seed, dflash_every)
        run_load(srv, bodies[:2], 1)  # warm-up: builds the step graphs of the common shapes
        run_load(srv, bodies[: 2 * concurrency], concurrency)
        alone, t_one = run_load(srv, bodies, 1)
        batched, t_many = run_load(srv, bodies, concurrency)
    same = [a == b for a, b in zip(alone, batched)]
    res = {
        "model": model,
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "one_at_a_time_req_per_s": requests / t_one,
        "concurrent_req_per_s": requests / t_many,
        "speedup": t_one / t_many,
        "all_equal_alone": all(same),
        "unequal": [i for i, s in enumerate(same) if not s],
        "batching": True,
    }
    print(f"one at a time: {res['one_at_a_time_req_per_s']:.2f} req/s | concurrency {concurrency}: "
          f"{res['concurrent_req_per_s']:.2f} req/s | ratio {res['speedup']:.2f}x | "
          f"every response equal to the request alone: {res['all_equal_alone']}", flush=True)  # fmt: skip
    return res


# ---- several users in one step: step-level measurement -----------------------------------------


class StepRunner:
    """Runs one rank's compiled step graphs: persistent launches on a GPU (rank 0 of `world`, solo
    collectives, synthetic weights), the reference executor on the CPU (the smoke test). One KV
    cache pool for every mixed step; the single-sequence steps get their own caches."""

    def __init__(self, cfg: Any, device: str, world: int, max_seq: int, slots: int) -> None:
        self.cfg, self.device, self.world, self.max_seq, self.slots = cfg, device, world, max_seq, slots
        self.params: dict = {}
        self.pool: dict = {}
        self.steps: dict = {}

    def graph(self, rows: int, mode: str, mixed: bool) -> Any:
        key = (rows, mode, mixed)
        if key not in self.steps:
            slots = self.slots + 1 if mixed else 0
            g = build_step_graph(self.cfg, tokens=rows, max_seq=self.max_seq, mode=mode, slots=slots)
            self.steps[key] = self._prepare(g, mixed)
        return self.steps[key]

    def _prepare(self, g: Any, mixed: bool) -> Any:
        if self.device == "cpu":
            from tilert.models.binding import bind_params
            from tilert.models.weights import synthetic_weights
            from tilert.passes import shard_for_ranks
            from tilert.runtime.reference import ReferenceExecutor

            w = self.__dict__.setdefault("_weights", synthetic_weights(self.cfg, 0))
            graphs = shard_for_ranks(g, self.world)
            ex = ReferenceExecutor([bind_params(rg, w, {}) for rg in graphs])
            if mixed:
                ex.states = self.__dict__.setdefault("_pool_states", ex.states)
            return ("ref", graphs, ex)
        from tilert.engine.persistent import compile_step
        from tilert.runtime.eager.synthetic import synthetic_params
        from tilert.runtime.persistent.step import PersistentStep

        rg, sched = compile_step(g, self.max_seq, self.world)
        if not self.params:  # every step graph of a model binds the same weights: one copy (~70 GB at full scale)
            self.params = synthetic_params(rg, seed=0)
        st = PersistentStep(rg, sched.table, sched.counter_expected, self.params,
                            states=self.pool if mixed else {})  # fmt: skip
        return ("persistent", st)

    def run(self, prepared: Any, inputs: dict) -> dict:
        if prepared[0] == "ref":
            return prepared[2].run(prepared[1], inputs)[0]
        return prepared[1].run({k: v.to("cuda") for k, v in inputs.items()})

    def time_ms(self, prepared: Any, inputs: dict, iters: int) -> float:
        if prepared[0] == "ref":
            t0 = time.perf_counter()
            for _ in range(iters):
                self.run(prepared, inputs)
            return (time.perf_counter() - t0) / iters * 1e3
        dev = {k: v.to("cuda") for k, v in inputs.items()}
        st = prepared[1]
        st.run(dev)
        ms = time_cuda(lambda: st.launch(dev), iters=iters, warmup=3)
        st.check()
        return ms


def bench_max_seq(context: int) -> int:
    """The KV capacity of the measured steps: benchmarks/e2e.py's (context + 64), so the single-user
    steps are the ones it compiles (scripts/precompile_gpu.py builds both)."""
    return context + 64


def mixed_inputs(users: int, rows_each: int, context: int, vocab: int, gen: torch.Generator) -> dict:
    """`users` sequences (slots 0..users-1) of `rows_each` rows at positions context.. (a user's
    context differs by a few tokens, as real users' would)."""
    toks, pos, slots = [], [], []
    for u in range(users):
        start = context + 3 * u
        toks.append(torch.randint(0, vocab, (rows_each,), generator=gen, dtype=torch.int32))
        pos.append(torch.arange(start, start + rows_each, dtype=torch.int32))
        slots.append(torch.full((rows_each,), u, dtype=torch.int32))
    return {"tokens": torch.cat(toks), "positions": torch.cat(pos), "slots": torch.cat(slots)}


def split_rows(users: int, rows_each: int, most: int) -> list[int]:
    """How many users' blocks go into each step when all of them do not fit one (`most` rows)."""
    per = max(1, most // rows_each)
    return [min(per, users - i) for i in range(0, users, per)]


def users_bench(model: str, device: str, world: int, users: list[int], context: int, accept_len: float,
                iters: int, drafter_ms: float | None = None) -> dict:  # fmt: skip
    cfg = load_config(model)
    block = cfg.dflash.block_size if cfg.dflash else 8
    max_seq = bench_max_seq(context)
    if context + 3 * (max(users) - 1) + block > max_seq:
        raise SystemExit(f"{max(users)} users' blocks at context {context} do not fit max_seq {max_seq}")
    most = BATCH_ROWS[-1]
    run = StepRunner(cfg, device, world, max_seq, max(users))
    gen = torch.Generator().manual_seed(0)

    def one_sequence(rows: int) -> dict:  # a single-sequence step's inputs (no slots)
        x = mixed_inputs(1, rows, context, cfg.vocab_size, gen)
        return {"tokens": x["tokens"], "positions": x["positions"]}

    single = {
        "decode_ms": run.time_ms(run.graph(1, "decode", False), one_sequence(1), iters),
        "verify_ms": run.time_ms(run.graph(block, "verify", False), one_sequence(block), iters),
    }
    if drafter_ms is None:
        drafter_ms = drafter_step_ms(cfg, device, world, context, max_seq) if cfg.dflash else 0.0
    plain_1 = 1e3 / single["decode_ms"]
    dflash_1 = accept_len * 1e3 / (single["verify_ms"] + drafter_ms)
    rows = []
    for U in users:
        x = mixed_inputs(U, 1, context, cfg.vocab_size, gen)
        ms = run.time_ms(run.graph(U, "decode", True), x, iters)
        verify = 0.0
        for n in split_rows(U, block, most):
            x = mixed_inputs(n, block, context, cfg.vocab_size, gen)
            verify += run.time_ms(run.graph(n * block, "decode", True), x, iters)
        round_ms = verify + U * drafter_ms
        row = {
            "users": U,
            "plain_step_ms": ms,
            "plain_tokens_per_s_per_user": 1e3 / ms,
            "plain_tokens_per_s_total": U * 1e3 / ms,
            "plain_step_over_single": ms / single["decode_ms"],
            "plain_total_over_single_user": U * single["decode_ms"] / ms,
            "dflash_verify_steps": split_rows(U, block, most),
            "dflash_round_ms": round_ms,
            "dflash_tokens_per_s_per_user": accept_len * 1e3 / round_ms,
            "dflash_tokens_per_s_total": U * accept_len * 1e3 / round_ms,
            "dflash_total_over_single_user": U * (accept_len * 1e3 / round_ms) / dflash_1,
        }
        rows.append(row)
        print(f"U={U}: plain {ms:.3f} ms/step ({row['plain_tokens_per_s_total']:.1f} tok/s total, "
              f"{row['plain_step_over_single']:.2f}x the single-user step) | DFlash round {round_ms:.3f} ms "
              f"({row['dflash_tokens_per_s_total']:.1f} tok/s total)", flush=True)  # fmt: skip
    return {
        "model": model,
        "world_size": world,
        "rank": 0,
        "mode": "solo rank 0" if world > 1 else "one rank",
        "device_kind": device,
        "context": context,
        "accept_len": accept_len,
        "block": block,
        "single_user": {
            **single,
            "drafter_ms": drafter_ms,
            "plain_tokens_per_s": plain_1,
            "dflash_tokens_per_s": dflash_1,
        },
        "users": rows,
        "note": "persistent mixed steps of rank 0 (synthetic weights, solo collectives); DFlash tokens/s = "
        "accept_len / (verify steps of at most 16 rows + one drafter pass per user): the oracle drafter's "
        "acceptance, SYNTHETIC drafts",
        "routing": "the synthetic router's, per token: each user's rows reach experts of their own",
        "synthetic": True,
    }


def drafter_step_ms(cfg: Any, device: str, world: int, context: int, max_seq: int) -> float:
    """One drafter pass (eager + CUDA graph on the GPU, as benchmarks/e2e.py measures it)."""
    if device == "cpu":
        return 0.0
    from benchmarks.e2e import bench_drafter

    d = bench_drafter(cfg, argparse.Namespace(world_size=world, context=context), max_seq)
    return float(d["eager_graph_ms"] if d["eager_graph_ms"] is not None else d["eager_ms"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    ld = sub.add_parser("load", help="serving load test (CPU): one at a time vs concurrent")
    ld.add_argument("--model", default="tiny")
    ld.add_argument("--requests", type=int, default=200)
    ld.add_argument("--concurrency", type=int, default=16)
    ld.add_argument("--max-tokens", type=int, default=16)
    ld.add_argument("--dflash-every", type=int, default=0, help="every Nth request speculative (0: none)")
    ld.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ld.add_argument("--out", default=None, help="also write the figures as JSON into this folder")
    us = sub.add_parser("users", help="1/2/4/8 users in one persistent step (GPU; --device cpu: smoke test)")
    us.add_argument("--model", default="mimo-v2.5-pro")
    us.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    us.add_argument("--world-size", type=int, default=8)
    us.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8])
    us.add_argument("--context", type=int, default=4096)
    us.add_argument("--accept-len", type=float, default=6.3)
    us.add_argument("--iters", type=int, default=20)
    us.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.mode == "load":
        res = load_test(a.requests, a.concurrency, a.model, a.max_tokens, dflash_every=a.dflash_every,
                        threads=a.threads)  # fmt: skip
        if a.out:
            path = Path(a.out) / f"batching-load-{a.model}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=1))
        return res
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("users --device cuda needs a GPU (use --model tiny --device cpu for the smoke test)")
    res = users_bench(a.model, a.device, a.world_size, a.users, a.context, a.accept_len, a.iters)
    if a.device == "cuda":
        print(write_result("batching", res, a.out))
    else:
        path = Path(a.out or Path(__file__).parent / "results") / f"batching-{a.model}-cpu-smoke.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        print(path)
    return res


if __name__ == "__main__":
    main()
