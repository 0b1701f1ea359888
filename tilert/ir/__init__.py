"""The graph IR: values, nodes, graphs, and the registry of op kinds.

Importing the package registers the built-in op kinds (tilert/ir/opset), so every module that
reads a graph sees them.
"""

from tilert.ir import opset  # noqa: F401
