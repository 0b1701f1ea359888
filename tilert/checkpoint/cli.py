"""`python -m tilert quantize`: bf16 checkpoint -> per-rank MXFP4/FP8 shards + manifest."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def add_quantize_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="quantise a bf16 checkpoint into per-rank MXFP4/FP8 shards + manifest")
    p.add_argument("--in", dest="src", required=True, help="HF safetensors checkpoint (file or directory)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--gpus", type=int, default=1, help="world size (ranks) to shard for")
    p.add_argument("--model", default=None, help="shipped model name (default: config.json next to the input)")
    p.add_argument("--config", default=None, help="path to a config.json (overrides --model)")
    p.add_argument(
        "--drafter",
        default=None,
        help="DFlash drafter directory to carry into OUT/dflash (default: the input's dflash/, if any)",
    )
    p.add_argument("--max-file-gb", type=float, default=4.0, help="split each rank's output into files of this size")
    p.add_argument("--quiet", action="store_true", help="no progress bar or info messages (also: TILERT_QUIET=1)")
    p.set_defaults(fn=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from tilert.checkpoint.drafter import drafter_for_quantize
    from tilert.checkpoint.quantize import quantize_checkpoint
    from tilert.models.config import load_config
    from tilert.progress import configure_logging

    configure_logging(args.quiet)
    if args.max_file_gb <= 0:
        raise ValueError(f"--max-file-gb must be > 0, got {args.max_file_gb}")
    name = args.config or args.model
    cfg = load_config(name) if name else None
    t0 = time.perf_counter()
    carry = drafter_for_quantize(args.src, args.drafter, cfg)  # checked before the long quantisation
    m = quantize_checkpoint(
        args.src,
        args.out,
        args.gpus,
        cfg,
        max_file_bytes=int(args.max_file_gb * (1 << 30)),
    )
    if carry is not None:
        m["drafter"] = carry(args.out)
    summary = {
        "model": m["model"],
        "world": m["world"],
        "quantization": m["quantization"],
        "files": [f for r in m["ranks"] for f in r["files"]],
        "tensors_per_rank": [len(r["tensors"]) for r in m["ranks"]],
        "tokenizer": m["tokenizer"],
        "drafter": m.get("drafter", {}).get("drafter"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(summary))
    return 0
