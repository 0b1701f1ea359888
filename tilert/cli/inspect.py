"""`python -m tilert inspect`: a model's config, layer pattern, op and parameter counts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tilert.cli.common import add_model_args, model_config
from tilert.models.builder import build_step_graph
from tilert.models.config import ModelConfig, list_models
from tilert.models.weights import logical_param_counts


def add_inspect_parser(sub: Any) -> None:
    pi = sub.add_parser("inspect", help="print a model's config, layer pattern, op and parameter counts")
    add_model_args(pi)
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.add_argument("--list", action="store_true", help="list the shipped models")
    pi.set_defaults(fn=cmd_inspect)


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
