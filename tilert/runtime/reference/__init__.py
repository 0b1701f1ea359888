"""The reference executor: runs any graph on the CPU with torch."""

from tilert.runtime.reference.executor import ReferenceExecutor, bind_env, run_graphs

__all__ = ["ReferenceExecutor", "bind_env", "run_graphs"]
