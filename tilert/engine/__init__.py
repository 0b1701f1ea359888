"""The decode loop and the embedding API."""

from tilert.engine.backend import ReferenceBackend, StepBackend
from tilert.engine.generate import GenerationError, GenerationResult, OracleDrafter, generate

__all__ = ["GenerationError", "GenerationResult", "OracleDrafter", "ReferenceBackend", "StepBackend", "generate"]
