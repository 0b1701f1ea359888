"""What every command shares: model and checkpoint arguments, token ids, the weights a command
runs with, and CLIError."""

from __future__ import annotations

import argparse
from typing import Any

from tilert.checkpoint import open_checkpoint
from tilert.models.config import ModelConfig, load_config
from tilert.models.weights import synthetic_weights
from tilert.progress import configure_logging

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


def load_weights(args: argparse.Namespace) -> tuple[ModelConfig, Any]:
    """(config, weights): a checkpoint through the one loader (config from it unless --model/--config),
    else seeded synthetic weights."""
    if args.weights:
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
    return cfg, synthetic_weights(cfg, args.seed)
