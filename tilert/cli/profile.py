"""`python -m tilert profile`: compile a model with per-pass timing and IR sizes, then write the
roofline table/plot and the predicted per-SM timeline of one rank's persistent schedule."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tilert.models.config import load_config
from tilert.profile.report import profile_model


def add_profile_parser(sub: Any) -> None:
    p = sub.add_parser("profile", help="per-pass compile time/IR size, roofline, predicted per-SM trace")
    p.add_argument("--model", default="mimo-v2.5-pro", help="shipped model name")
    p.add_argument("--config", default=None, help="path to a config.json (overrides --model)")
    p.add_argument("--gpus", type=int, default=8, help="world size to compile for")
    p.add_argument("--rank", type=int, default=0, help="rank whose kernels and schedule are reported")
    p.add_argument("--gpu", default="h200", help="GPU spec of the cost model")
    p.add_argument("--max-seq", type=int, default=4096, help="KV cache capacity the plan is built for")
    p.add_argument("--context", type=int, default=None, help="KV length the cost model assumes (default max-seq)")
    p.add_argument("--steps", default="decode,verify", help="comma list of decode, verify")
    p.add_argument("--out", default=None, help="directory for profile.json, roofline.png and trace_*.json")
    p.add_argument("--top", type=int, default=15, help="kernels shown in the printed roofline table")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also run the rank graph on the eager runtime (synthetic weights) and report each "
        "kernel's measured time against its floor",
    )
    p.add_argument("--device", default=None, help="where --measure runs: cuda (default when a GPU is visible) or cpu")
    p.set_defaults(fn=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    cfg = load_config(args.config or args.model)
    report = profile_model(
        cfg, args.gpus, rank=args.rank, gpu=args.gpu, max_seq=args.max_seq, context=args.context,
        steps=[s.strip() for s in args.steps.split(",") if s.strip()], out=args.out, top=args.top,
        log=lambda m: print(m, file=sys.stderr, flush=True), measure=args.measure, device=args.device,
    )  # fmt: skip
    print(report["text"])
    return 0
