"""Config -> a started Engine over a freshly loaded Backend (blocking; run it in a thread)."""

from __future__ import annotations

from ..config import DEFAULT_MODEL_FILE, Config
from ..modelfiles import resolve_model
from .backend import Backend, BackendParams
from .scheduler import Engine


def backend_params(config: Config) -> BackendParams:
    """One unified KV cache of ctx_size cells per slot, one sequence id per slot."""
    return BackendParams(
        model_path=resolve_model(config.model, config.models_dir, DEFAULT_MODEL_FILE),
        n_ctx=config.ctx_size * config.parallel,
        n_batch=config.n_batch,
        n_threads=config.n_threads,
        n_seq_max=config.parallel,
        use_gpu=config.use_gpu,
    )


def load_engine(config: Config) -> Engine:
    backend = Backend(backend_params(config))
    engine = Engine(backend, parallel=config.parallel, n_ctx_slot=config.ctx_size,
                    n_batch=config.n_batch, queue_size=config.queue_size)
    engine.start()
    return engine
