"""Command line: `python -m tilert {inspect, generate, compile, ...}`.

Every user error (unknown model, bad config field, bad ids, a plan that does not fit) is a
ValueError subclass somewhere below; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tilert.models.config import ModelConfig, load_config

EXIT_USAGE = 2


class CLIError(ValueError):
    """A bad command-line value; the message names it."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mimo-v2.5-pro", help="shipped model name (see `inspect --list`)")
    p.add_argument("--config", default=None, help="path to a config.json of this family (overrides --model)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return load_config(args.config or args.model)


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """How a checkpoint given with --weights loads (docs/checkpoints.md)."""
    p.add_argument("--quantize", choices=("auto", "on-load", "none"), default="auto",
                   help="HF checkpoints: auto (default) quantises linears stored in bf16 to the config's formats "
                        "and runs quantised ones as stored; on-load converts every linear to the config's formats; "
                        "none runs every tensor as stored (bf16 stays bf16)")  # fmt: skip
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="skip the manifest's sha256 checks (and load a sharded checkpoint whose manifest is missing)")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CLIError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-ids is empty")
    return ids


# ---- inspect -----------------------------------------------------------------------------------


def layer_pattern(cfg: ModelConfig) -> str:
    """Compact per-layer pattern, e.g. 'F(dense) S S S S S S F ...' as run-length groups."""
    tags = [("S" if cfg.is_sliding(i) else "F") + ("" if cfg.is_moe(i) else "d") for i in range(cfg.num_hidden_layers)]
    runs: list[list[Any]] = []
    for t in tags:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return " ".join(f"{t}x{n}" if n > 1 else t for t, n in runs)


def inspect_summary(cfg: ModelConfig) -> dict[str, Any]:
    from tilert.models.builder import build_step_graph
    from tilert.models.weights import logical_param_counts

    g = build_step_graph(cfg, tokens=1, max_seq=64)
    counts = logical_param_counts(cfg)
    n_swa = sum(cfg.is_sliding(i) for i in range(cfg.num_hidden_layers))
    return {
        "model": cfg.name,
        "layers": cfg.num_hidden_layers,
        "sliding_window_layers": n_swa,
        "full_attention_layers": cfg.num_hidden_layers - n_swa,
        "moe_layers": sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)),
        "experts": cfg.n_routed_experts,
        "top_k": cfg.num_experts_per_tok,
        "layer_pattern": layer_pattern(cfg),
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_drafter": counts["drafter"],
        "decode_graph_ops": g.op_counts(),
        "decode_graph_nodes": len(g.nodes),
        "config": cfg.to_dict(),
    }


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.list:
        from tilert.models.config import list_models

        print("\n".join(list_models()))
        return 0
    s = inspect_summary(model_config(args))
    if args.json:
        print(json.dumps(s, indent=1))
        return 0
    print(
        f"model {s['model']}: {s['layers']} layers ({s['sliding_window_layers']} sliding-window, "
        f"{s['full_attention_layers']} full), {s['moe_layers']} MoE layers, {s['experts']} experts top-{s['top_k']}"
    )
    print(
        f"parameters: {_human(s['params_total'])} total, {_human(s['params_active'])} active per token"
        f" (+{_human(s['params_drafter'])} DFlash drafter)"
    )
    print(f"layer pattern (S=sliding, F=full, d=dense MLP): {s['layer_pattern']}")
    print(f"decode step graph (B=1): {s['decode_graph_nodes']} ops")
    for k, v in s["decode_graph_ops"].items():
        print(f"  {k:16s} {v}")
    print("config:")
    for k, v in s["config"].items():
        if k not in ("hybrid_layer_pattern", "moe_layer_freq"):
            print(f"  {k}: {v}")
    return 0


# ---- generate ----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from tilert.engine import ReferenceBackend, generate
    from tilert.engine.generate import SamplingParams

    ids = parse_ids(args.prompt_ids)
    kind = args.backend or ("reference" if args.device == "cpu" else "eager")
    if kind == "reference" and args.device != "cpu":
        raise CLIError(f"--backend reference runs on the CPU, not --device {args.device}")
    if kind != "reference":
        import torch

        if args.device != "cuda" or not torch.cuda.is_available():
            raise CLIError(f"--backend {kind} needs --device cuda and a visible CUDA GPU")
        if args.ranks != 1:
            raise CLIError(f"--backend {kind} runs one rank per process (torchrun for more: see docs/runtime.md)")
    cfg, weights = _load_weights(args)
    if args.drafter:
        from tilert.checkpoint.drafter import attach_drafter

        cfg, weights = attach_drafter(cfg, weights, args.drafter)
    max_seq = args.max_seq or max(64, 1 << (len(ids) + args.max_new_tokens + 16).bit_length())
    if hasattr(weights, "unsliced"):  # a checkpoint quantised for several ranks: each binds its own files
        from tilert.checkpoint.sharded import ShardedReferenceBackend

        if kind != "reference":
            raise CLIError(f"a checkpoint sharded for {weights.world} ranks runs on --backend reference here")
        backend = ShardedReferenceBackend(cfg, weights, max_seq=max_seq)
    elif kind == "reference":
        backend = ReferenceBackend(cfg, weights, max_seq=max_seq, world=args.ranks)
    elif kind == "eager":
        from tilert.runtime.eager.backend import EagerBackend

        backend = EagerBackend(cfg, weights, max_seq=max_seq, cuda_graph=args.cuda_graph)
    else:
        from tilert.runtime.persistent.backend import PersistentBackend

        backend = PersistentBackend(cfg, weights, max_seq=max_seq)
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.sample_seed)
    res = generate(backend, ids, args.max_new_tokens, speculative=args.speculative, sampling=sampling)
    print(",".join(map(str, res.tokens)))
    if args.stats:
        print(json.dumps(res.stats()), file=sys.stderr)
    return 0


def _load_weights(args: argparse.Namespace) -> tuple[ModelConfig, Any]:
    """(config, weights): a checkpoint through the one loader (config from it unless --model/--config),
    else seeded synthetic weights."""
    from tilert.models import weights as W

    if args.weights:
        from tilert.checkpoint import open_checkpoint
        from tilert.progress import configure_logging

        configure_logging(args.quiet)
        name = args.config or args.model
        ck = open_checkpoint(
            args.weights, load_config(name) if name else None,
            quantize=args.quantize, verify_checksums=not args.no_verify_checksums,
        )  # fmt: skip
        return ck.config, ck.weights
    cfg = load_config(args.config or args.model or "tiny")
    if cfg.num_hidden_layers * cfg.hidden_size * cfg.n_routed_experts > 64 * 4096 * 64:
        raise CLIError(
            f"model '{cfg.name}' is too large for synthetic weights on the CPU; pass --weights or use a tiny model"
        )
    return cfg, W.synthetic_weights(cfg, args.seed)


# ---- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tilert", description="tilert: tile-level MoE decode compiler/runtime")
    sub = p.add_subparsers(dest="command", required=True)

    pi = sub.add_parser("inspect", help="print a model's config, layer pattern, op and parameter counts")
    add_model_args(pi)
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.add_argument("--list", action="store_true", help="list the shipped models")
    pi.set_defaults(fn=cmd_inspect)

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
    pg.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    pg.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass to keep")
    pg.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: all)")
    pg.add_argument("--sample-seed", type=int, default=None, help="sampling: seed (reproducible tokens)")
    pg.set_defaults(fn=cmd_generate)

    for hook in _extra_commands():
        hook(sub)
    return p


def _extra_commands() -> list[Callable[[Any], None]]:
    hooks = []
    try:
        from tilert.compile_cli import add_compile_parser

        hooks.append(add_compile_parser)
    except ImportError:
        pass
    from tilert.checkpoint.cli import add_quantize_parser
    from tilert.profile.cli import add_profile_parser
    from tilert.runtime.eager.launch import add_launch_parser
    from tilert.serve.cli import add_serve_parser

    hooks += [add_quantize_parser, add_serve_parser, add_profile_parser, add_launch_parser]
    return hooks


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ValueError as e:  # every user-facing error class derives from ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        if not getattr(e, "user_facing", False):  # a bug: keep the stack
            raise
        print(f"error: {e}", file=sys.stderr)  # a GPU step that failed (a timed-out wait, say)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
