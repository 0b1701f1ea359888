"""Task kinds: one module per kind of tile task, holding what every runtime runs for it (eager
implementations, persistent node programs, plan VM tile bodies); see registry.py. Importing the
package registers the built-in kinds."""

from tilert.runtime.kinds import attention, collective, elementwise, kv_append, linear, lm_head, moe  # noqa: F401
from tilert.runtime.kinds.registry import TaskKind, eager_impl, for_node, for_opcode, registered, task_kind

__all__ = ["TaskKind", "eager_impl", "for_node", "for_opcode", "registered", "task_kind"]
