"""`python -m tilert launch`: multi-rank eager generation, one process per rank (under torchrun).

    torchrun --nproc-per-node 2 -m tilert launch --model tiny --device cpu \\
        --prompt-ids 1,2,3 --max-new-tokens 8 [--speculative dflash]

Every rank builds the sharded step graphs, binds its slices of the full checkpoint (synthetic
weights from --seed, or --weights) and runs the same decode loop; rank 0 prints the ids. Without
torchrun it runs as a world of one. Errors print one line naming the rank; exit code 2 for a bad
argument, 1 for a failed run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tilert.checkpoint import load_safetensors
from tilert.cli.common import model_config, parse_ids
from tilert.engine import generate
from tilert.engine.eager import DistEagerBackend
from tilert.models.weights import synthetic_weights
from tilert.runtime.eager.distributed import init_distributed

EXIT_USAGE, EXIT_FAILED = 2, 1


def add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="shipped model name")
    p.add_argument("--config", default=None, help="path to a config.json (overrides --model)")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="cpu (gloo) or cuda (NCCL)")
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--speculative", choices=["dflash"], default=None)
    p.add_argument("--weights", default=None, help="safetensors file or directory (default: seeded synthetic)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    p.add_argument("--max-seq", type=int, default=None, help="KV cache capacity in tokens")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any collective may block")
    p.add_argument("--no-kernels", action="store_true", help="plain torch instead of the TileLang kernels")
    p.add_argument("--cuda-graph", action="store_true", help="replay steps from CUDA graphs (cuda only)")
    p.add_argument("--stats", action="store_true", help="print step statistics as JSON on stderr (rank 0)")


def add_launch_parser(sub: Any) -> None:
    p = sub.add_parser("launch", help="multi-rank eager generation, one process per rank (under torchrun)")
    add_launch_args(p)
    p.set_defaults(fn=cmd_launch)


def run(args: argparse.Namespace) -> list[int]:
    """Generate on this rank; every rank returns the same ids."""
    cfg = model_config(args)
    ids = parse_ids(args.prompt_ids)
    ctx = init_distributed(args.device, timeout_s=args.timeout, kernels=not args.no_kernels)
    try:
        weights = load_safetensors(args.weights, cfg) if args.weights else synthetic_weights(cfg, args.seed)
        max_seq = args.max_seq or max(64, 1 << (len(ids) + args.max_new_tokens + 16).bit_length())
        backend = DistEagerBackend(
            cfg, weights, ctx, max_seq=max_seq, cuda_graph=args.cuda_graph, use_kernels=not args.no_kernels
        )
        res = generate(backend, ids, args.max_new_tokens, speculative=args.speculative)
        if ctx.rank == 0 and args.stats:
            print(json.dumps({**res.stats(), "world": ctx.world, "collectives": ctx.collectives}), file=sys.stderr)
        return res.tokens
    finally:
        ctx.close()


def cmd_launch(args: argparse.Namespace) -> int:
    rank = os.environ.get("RANK", "0")
    try:
        tokens = run(args)
    except ValueError as e:  # a bad argument (ids, model, context too long)
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a failed collective names its rank already
        msg = str(e) if str(e).startswith("rank ") else f"rank {rank}: {type(e).__name__}: {e}"
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_FAILED
    if rank == "0":
        print(",".join(map(str, tokens)), flush=True)
    return 0
