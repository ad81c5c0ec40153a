"""The llama.cpp backend: the only module that imports `llama_cpp`.

It loads a GGUF model and creates a context through llama-cpp-python's low-level API. The
constructor runs in a worker thread (engine/loader.py) before the engine starts; after that,
everything here runs on the engine thread, except `tokenize` (the vocabulary is read-only).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp as C

from ..errors import ModelLoadError, ModelNotReady
from .batch import Batch

log = logging.getLogger(__name__)

llama_log = logging.getLogger("lollms_fast.llama_cpp")

# ggml's log levels (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continuation)
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR}
_backend_ready = False


@C.llama_log_callback
def _log_to_logging(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama-cpp-python's own callback maps the levels wrongly and prints warnings to stderr;
    # llama.cpp's chatter goes to our logger (errors shown, the rest at debug)
    py_level = _GGML_LEVELS.get(level, logging.DEBUG)
    if llama_log.isEnabledFor(py_level):
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            llama_log.log(py_level, "%s", message)


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        C.llama_log_set(_log_to_logging, ctypes.c_void_p(0))
        C.llama_backend_init()
        _backend_ready = True


@dataclass(frozen=True)
class BackendParams:
    model_path: Path
    n_ctx: int  # total KV cells, shared by all sequences (unified cache)
    n_batch: int
    n_threads: int
    n_seq_max: int
    use_gpu: bool = False


class Backend:
    """A loaded model and its context. Not thread-safe: owned by the engine thread."""

    def __init__(self, params: BackendParams) -> None:
        self.params = params
        self._vocab_lock = threading.Lock()
        _init_backend()
        path = params.model_path
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = 999 if params.use_gpu else 0
        model = C.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load the model file {path} "
                                 f"(corrupt or unsupported GGUF)")
        self.model = model
        # a context past what the model was trained on gives garbage, and a huge one could
        # exhaust memory: refuse it before any KV cache is allocated
        self.n_ctx_train = int(C.llama_model_n_ctx_train(model))
        per_slot = params.n_ctx // max(1, params.n_seq_max)
        if self.n_ctx_train > 0 and per_slot > self.n_ctx_train:
            C.llama_model_free(model)
            self.model = None
            raise ModelLoadError(f"ctx_size {per_slot} is larger than the training context of "
                                 f"{path.name} ({self.n_ctx_train} tokens); lower ctx_size")
        cparams = C.llama_context_default_params()
        cparams.n_ctx = params.n_ctx
        cparams.n_batch = params.n_batch
        cparams.n_ubatch = params.n_batch
        cparams.n_seq_max = params.n_seq_max
        cparams.n_threads = params.n_threads
        cparams.n_threads_batch = params.n_threads
        cparams.kv_unified = True
        # sliding-window models (Gemma 3) keep the full cache so a prefix can be reused
        cparams.swa_full = True
        cparams.no_perf = True
        # what a saved sequence state depends on besides the model file (KV tiers check it)
        self.state_format = {"llama_cpp": str(llama_cpp.__version__), "swa_full": True,
                             "type_k": int(cparams.type_k), "type_v": int(cparams.type_v),
                             "n_ctx_slot": per_slot, "kv_unified": True}
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            C.llama_model_free(model)
            self.model = None
            raise ModelLoadError(f"llama.cpp could not create a context for {path} "
                                 f"(n_ctx={params.n_ctx}: not enough memory?)")
        self.ctx = ctx
        self.vocab = C.llama_model_get_vocab(model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self._memory = C.llama_get_memory(ctx)
        # token id -> its bytes, filled on first use (a piece is never re-fetched, and the
        # answer is never re-detokenized as a whole)
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._eog: dict[int, bool] = {}
        self._row_type = ctypes.c_float * self.n_vocab
        self._bound: Batch | None = None
        self._lbatch = C.llama_batch()
        self._seq_ptrs: ctypes.Array[ctypes.c_void_p] | None = None

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        """Tokens of `text`; `add_special` adds BOS (if the model wants one), `parse_special`
        turns spelled control tokens (`<end_of_turn>`) into those tokens: only for text the
        server trusts, never for what a user typed."""
        with self._vocab_lock:  # other threads tokenize; `close` must not free it meanwhile
            if self.model is None:
                raise ModelNotReady("the model was unloaded (an engine reload); retry")
            return self._tokenize(text.encode("utf-8"), add_special, parse_special)

    def _tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special,
                             parse_special)
        if n < 0:  # the buffer was too small: -n is the size needed
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special,
                                 parse_special)
        return list(buf[:n])

    # ------------------------------------------------------------------ decoding

    def _bind(self, batch: Batch) -> None:
        """Point the llama_batch at the numpy arrays of `batch` (once per Batch object)."""
        # llama-cpp-python declares these pointer fields as arrays; they take pointers
        lb: Any = self._lbatch
        i32 = ctypes.POINTER(ctypes.c_int32)
        lb.token = batch.token.ctypes.data_as(i32)
        lb.embd = None
        lb.pos = batch.pos.ctypes.data_as(i32)
        # one sequence per token: n_seq_id is all ones, seq_id[i] points at batch.seq[i]
        self._n_seq_id = np.ones(batch.capacity, dtype=np.int32)
        lb.n_seq_id = self._n_seq_id.ctypes.data_as(i32)
        base = batch.seq.ctypes.data
        self._seq_ptrs = (ctypes.c_void_p * batch.capacity)(
            *(base + 4 * i for i in range(batch.capacity)))
        lb.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(C.llama_seq_id)))
        lb.logits = batch.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._bound = batch

    def decode(self, batch: Batch) -> int:
        if batch is not self._bound:
            self._bind(batch)
        self._lbatch.n_tokens = batch.n
        return int(C.llama_decode(self.ctx, self._lbatch))

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        """Zero-copy float32 view of the logits row of batch index `index` (valid until the
        next decode; writable, the sampler's repeat penalty edits it in place)."""
        ptr = C.llama_get_logits_ith(self.ctx, index)
        if not ptr:
            raise IndexError(f"no logits for batch index {index}")
        address = ctypes.cast(ptr, ctypes.c_void_p).value
        return np.frombuffer(self._row_type.from_address(address), dtype=np.float32)

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        """Drop positions [p0, p1) of a sequence (p1 < 0: to the end); False if impossible."""
        return bool(C.llama_memory_seq_rm(self._memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        C.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    # ------------------------------------------------------------------ sequence states

    def state_get(self, seq_id: int) -> bytearray:
        """A copy of one sequence's KV state (llama_state_seq_get_data), for the KV tiers."""
        size = int(C.llama_state_seq_get_size(self.ctx, seq_id))
        data = bytearray(size)
        if size:
            view = (ctypes.c_ubyte * size).from_buffer(data)
            written = int(C.llama_state_seq_get_data(self.ctx, view, size, seq_id))
            del view  # release the export of `data` so it can be resized below
            if written != size:
                data = data[:written]
        return data

    def state_set(self, seq_id: int, data: bytearray) -> bool:
        """Restore a state saved by state_get into `seq_id` (cleared first); False if
        llama.cpp refuses it (then the sequence is left empty)."""
        C.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        if not data:
            return False
        view = (ctypes.c_ubyte * len(data)).from_buffer(data)
        read = int(C.llama_state_seq_set_data(self.ctx, view, len(data), seq_id))
        if read == 0:
            C.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            return False
        return True

    def is_eog(self, token: int) -> bool:
        known = self._eog.get(token)
        if known is None:
            known = self._eog[token] = bool(C.llama_vocab_is_eog(self.vocab, token))
        return known

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing)."""
        cached = self._pieces[token]
        if cached is None:
            cached = self._pieces[token] = self._fetch_piece(token)
        return cached

    def _fetch_piece(self, token: int, special: bool = False) -> bytes:
        size = 32
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # too small: -n is the size needed

    # ------------------------------------------------------------------ chat template

    def chat_template(self) -> str | None:
        """The GGUF's `tokenizer.chat_template` (Jinja source), None when it has none."""
        key = b"tokenizer.chat_template"
        with self._vocab_lock:
            if self.model is None:
                raise ModelNotReady("the model was unloaded (an engine reload); retry")
            size = 4096
            while True:
                buf = ctypes.create_string_buffer(size)
                n = C.llama_model_meta_val_str(self.model, key, buf, size)
                if n < 0:
                    return None
                if n < size:  # snprintf: n is the full length, without the NUL
                    return buf.raw[:n].decode("utf-8", "replace")
                size = n + 1

    def special_token_text(self, kind: Literal["bos", "eos"]) -> str | None:
        """How the vocabulary spells its BOS or EOS token (`<bos>`), as chat templates use
        it; None when the model has no such token."""
        with self._vocab_lock:
            if self.model is None:
                raise ModelNotReady("the model was unloaded (an engine reload); retry")
            token = C.llama_vocab_bos(self.vocab) if kind == "bos" else C.llama_vocab_eos(
                self.vocab)
            if token < 0:  # LLAMA_TOKEN_NULL
                return None
            return self._fetch_piece(token, special=True).decode("utf-8", "replace")

    def close(self) -> None:
        with self._vocab_lock:
            self._free()

    def _free(self) -> None:
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            C.llama_model_free(self.model)
            self.model = None
