"""The reference executor: runs any graph on the CPU with torch."""

from tilert.runtime.reference.executor import ReferenceExecutor, run_graphs

__all__ = ["ReferenceExecutor", "run_graphs"]
