"""The inference engine: llama.cpp backend, continuous-batching scheduler, engine loading."""

from __future__ import annotations

from .loader import backend_params, load_engine
from .scheduler import (
    Engine,
    Finish,
    FinishReason,
    Generation,
    GenerationRequest,
    SamplingParams,
)

__all__ = [
    "Engine", "Finish", "FinishReason", "Generation", "GenerationRequest", "SamplingParams",
    "backend_params", "load_engine",
]
