"""Compiler passes: graph -> rank graphs -> fused kernels -> tile tasks -> schedule -> memory plan.

The pipeline is the one list `PIPELINE` in passes/manager.py; `compile_graph` runs it.
"""

from tilert.passes.manager import PIPELINE, PassContext, compile_graph, run_passes
from tilert.passes.shard import ShardError, shard_for_ranks

__all__ = ["PIPELINE", "PassContext", "ShardError", "compile_graph", "run_passes", "shard_for_ranks"]
