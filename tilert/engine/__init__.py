"""The decode loop and the embedding API."""

from tilert.engine.backend import ReferenceBackend, StepBackend
from tilert.engine.generate import OracleDrafter, generate
from tilert.engine.request import GenerationError, GenerationResult

__all__ = ["GenerationError", "GenerationResult", "OracleDrafter", "ReferenceBackend", "StepBackend", "generate"]
