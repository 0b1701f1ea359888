"""`python -m tilert generate`: greedy or DFlash speculative decoding of token ids on one backend."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from tilert.checkpoint.drafter import attach_drafter
from tilert.cli.common import CLIError, add_checkpoint_args, add_model_args, load_weights, parse_ids
from tilert.engine import ReferenceBackend, generate
from tilert.engine.backend import ShardedReferenceBackend
from tilert.engine.eager import EagerBackend
from tilert.engine.persistent import PersistentBackend
from tilert.engine.request import SamplingParams


def add_generate_parser(sub: Any) -> None:
    pg = sub.add_parser("generate", help="greedy (or DFlash speculative) decoding on the reference executor")
    add_model_args(pg)
    pg.set_defaults(model=None)  # tiny, or the checkpoint's config with --weights
    pg.add_argument("--device", default="cpu", help="cpu (reference executor) or cuda")
    pg.add_argument("--backend", choices=("reference", "eager", "persistent"), default=None,
                    help="runtime: reference (CPU; default with --device cpu), eager (one launch per fused op; "
                         "default with --device cuda) or persistent (one launch per step)")  # fmt: skip
    pg.add_argument("--cuda-graph", action="store_true", help="eager backend: replay each step from a CUDA graph")
    pg.add_argument("--prompt-ids", required=True, help="comma-separated token ids, e.g. 1,2,3")
    pg.add_argument("--max-new-tokens", type=int, default=16)
    pg.add_argument("--speculative", choices=["dflash"], default=None)
    pg.add_argument("--weights", default=None, help="checkpoint: HF safetensors file/dir or `quantize` output "
                    "(default: seeded synthetic weights)")  # fmt: skip
    add_checkpoint_args(pg)
    pg.add_argument("--quiet", action="store_true", help="no progress bars or info messages (also: TILERT_QUIET=1)")
    pg.add_argument("--drafter", default=None, help="DFlash drafter directory (published layout) for --speculative")
    pg.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights")
    pg.add_argument("--max-seq", type=int, default=None, help="KV cache capacity in tokens")
    pg.add_argument("--ranks", type=int, default=1, help="simulated tensor/expert-parallel ranks")
    pg.add_argument("--stats", action="store_true", help="print step statistics as JSON on stderr")
    pg.add_argument("--cycles-per-sync", type=int, default=1,
                    help="greedy decoding: decode steps (or --speculative dflash cycles) chained on the device "
                         "between host synchronisations (the same tokens; see docs/speculative.md)")  # fmt: skip
    pg.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    pg.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass to keep")
    pg.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: all)")
    pg.add_argument("--sample-seed", type=int, default=None, help="sampling: seed (reproducible tokens)")
    pg.set_defaults(fn=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    ids = parse_ids(args.prompt_ids)
    kind = args.backend or ("reference" if args.device == "cpu" else "eager")
    if kind == "reference" and args.device != "cpu":
        raise CLIError(f"--backend reference runs on the CPU, not --device {args.device}")
    if kind != "reference":
        if args.device != "cuda" or not torch.cuda.is_available():
            raise CLIError(f"--backend {kind} needs --device cuda and a visible CUDA GPU")
        if args.ranks != 1:
            raise CLIError(f"--backend {kind} runs one rank per process (torchrun for more: see docs/runtime.md)")
    cfg, weights = load_weights(args)
    if args.drafter:
        cfg, weights = attach_drafter(cfg, weights, args.drafter)
    max_seq = args.max_seq or max(64, 1 << (len(ids) + args.max_new_tokens + 16).bit_length())
    if hasattr(weights, "unsliced"):  # a checkpoint quantised for several ranks: each binds its own files
        if kind != "reference":
            raise CLIError(f"a checkpoint sharded for {weights.world} ranks runs on --backend reference here")
        backend = ShardedReferenceBackend(cfg, weights, max_seq=max_seq)
    elif kind == "reference":
        backend = ReferenceBackend(cfg, weights, max_seq=max_seq, world=args.ranks)
    elif kind == "eager":
        backend = EagerBackend(cfg, weights, max_seq=max_seq, cuda_graph=args.cuda_graph)
    else:
        backend = PersistentBackend(cfg, weights, max_seq=max_seq)
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.sample_seed)
    if args.cycles_per_sync < 1:
        raise CLIError(f"--cycles-per-sync must be >= 1, got {args.cycles_per_sync}")
    res = generate(backend, ids, args.max_new_tokens, speculative=args.speculative, sampling=sampling,
                   cycles_per_sync=args.cycles_per_sync)  # fmt: skip
    print(",".join(map(str, res.tokens)))
    if args.stats:
        print(json.dumps(res.stats()), file=sys.stderr)
    return 0
