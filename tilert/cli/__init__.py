"""Command line: `python -m tilert {inspect, generate, compile, launch, quantize, serve, profile}`.

One module per command (its parser and its function). Every user error (unknown model, bad config
field, bad ids, a plan that does not fit) is a ValueError subclass somewhere below; here it becomes
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tilert.cli.common import EXIT_USAGE
from tilert.cli.compile import add_compile_parser
from tilert.cli.generate import add_generate_parser
from tilert.cli.inspect import add_inspect_parser
from tilert.cli.launch import add_launch_parser
from tilert.cli.profile import add_profile_parser
from tilert.cli.quantize import add_quantize_parser
from tilert.cli.serve import add_serve_parser

COMMANDS = [add_inspect_parser, add_generate_parser, add_compile_parser, add_quantize_parser, add_serve_parser,
            add_profile_parser, add_launch_parser]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tilert", description="tilert: tile-level MoE decode compiler/runtime")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


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
