"""The inference engine: llama.cpp backend, continuous-batching scheduler, engine loading."""

from __future__ import annotations

from .loader import backend_params, load_engine
from .metrics import EngineMetrics
from .scheduler import (
    Engine,
    Finish,
    Generation,
    GenerationRequest,
    SamplingParams,
)
from .types import FinishReason

__all__ = [
    "Engine", "EngineMetrics", "Finish", "FinishReason", "Generation", "GenerationRequest",
    "SamplingParams", "backend_params", "load_engine",
]
