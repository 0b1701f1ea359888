"""The built-in op kinds. Importing this package registers them."""

from tilert.ir.opset import attention, basic, collective, fused, moe  # noqa: F401
