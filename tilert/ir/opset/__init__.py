"""The built-in op kinds. Importing this package registers them."""

from tilert.ir.opset import attention, basic, collective, drafter, fused, moe  # noqa: F401
