"""Config -> a started Engine over a freshly loaded Backend (blocking; run it in a thread)."""

from __future__ import annotations

from ..config import DEFAULT_MODEL_FILE, Config
from ..errors import ModelLoadError
from ..modelfiles import model_sha256, resolve_model
from .backend import Backend, BackendParams
from .kvcache import KVCache
from .scheduler import Engine

MB = 1024 * 1024


def backend_params(config: Config) -> BackendParams:
    """One KV stream of ctx_size cells per slot, one sequence id per slot."""
    return BackendParams(
        model_path=resolve_model(config.model, config.models_dir, DEFAULT_MODEL_FILE),
        n_ctx=config.ctx_size * config.parallel,
        n_batch=config.n_batch,
        n_threads=config.n_threads,
        n_seq_max=config.parallel,
        use_gpu=config.use_gpu,
    )


def kv_cache_for(config: Config, backend: Backend) -> KVCache | None:
    """The RAM and disk tiers of `config` (None when both budgets are 0). Stored states are
    tagged with the model's sha256 and the context's state format."""
    ram, disk = config.kv_cache_ram_mb * MB, config.kv_cache_disk_mb * MB
    if not ram and not disk:
        return None
    directory = config.kv_cache_path
    digest = model_sha256(backend.params.model_path, directory / "model-sha256.json")
    return KVCache(directory if disk else None, ram_budget=ram, disk_budget=disk,
                   meta={"model_sha256": digest, **backend.state_format})


def load_engine(config: Config) -> Engine:
    backend = Backend(backend_params(config))
    try:
        kv_cache = kv_cache_for(config, backend)
    except OSError as exc:
        backend.close()
        raise ModelLoadError(f"cannot prepare the KV cache folder: {exc}") from None
    engine = Engine(backend, parallel=config.parallel, n_ctx_slot=config.ctx_size,
                    n_batch=config.n_batch, queue_size=config.queue_size, kv_cache=kv_cache)
    engine.start()
    return engine
