"""The inference engine: llama.cpp backend, continuous-batching scheduler, engine loading."""

from __future__ import annotations

from .loader import backend_params, load_engine
from .scheduler import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    Engine,
    Finish,
    Generation,
    GenerationRequest,
    SamplingParams,
)

__all__ = [
    "CANCELLED", "ERROR", "LENGTH", "STOP", "Engine", "Finish", "Generation",
    "GenerationRequest", "SamplingParams", "backend_params", "load_engine",
]
