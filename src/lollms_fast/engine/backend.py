"""The llama.cpp backend: the only module that imports `llama_cpp`.

It loads a GGUF model and creates a context through llama-cpp-python's low-level API. The
constructor runs in a worker thread (engine/loader.py) before the engine starts; after that,
everything here runs on the engine thread, except `tokenize` (the vocabulary is read-only).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import llama_cpp as C
from llama_cpp.llama_grammar import json_schema_to_gbnf

from ..errors import BadRequest, ModelLoadError, ModelNotReady
from .batch import Batch

log = logging.getLogger(__name__)

llama_log = logging.getLogger("lollms_fast.llama_cpp")

# ggml's log levels (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continuation)
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR}
_backend_ready = False
# while a thread sets `errors` to a list, llama.cpp's error lines logged on it are kept there
# (Backend.grammar puts them in its error message)
_captured = threading.local()


@C.llama_log_callback
def _log_to_logging(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama-cpp-python's own callback maps the levels wrongly and prints warnings to stderr;
    # llama.cpp's chatter goes to our logger (errors shown, the rest at debug)
    errors: list[str] | None = getattr(_captured, "errors", None)
    if errors is not None and level == 4:
        errors.append(text.decode("utf-8", "replace").strip())
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
    n_ctx: int  # total KV cells: n_seq_max streams of n_ctx / n_seq_max cells
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
        # one KV stream per slot: a sequence's attention reads its own cells only (a unified
        # cache made every sequence attend over the whole used range: ~8% fewer tokens/s at
        # 8 clients); a prefix is reused inside its slot, and n > 1 choices copy the
        # leader's stream (llama_memory_seq_cp of a whole sequence)
        cparams.kv_unified = False
        # sliding-window models (Gemma 3) keep the full cache so a prefix can be reused
        cparams.swa_full = True
        cparams.no_perf = True
        # what a saved sequence state depends on besides the model file (KV tiers check it)
        self.state_format = {"llama_cpp": str(llama_cpp.__version__), "swa_full": True,
                             "type_k": int(cparams.type_k), "type_v": int(cparams.type_v),
                             "n_ctx_slot": per_slot, "kv_unified": False}
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
        self._grammars: weakref.WeakSet[Grammar] = weakref.WeakSet()
        self._candidates: _Candidates | None = None  # the grammars' full-row scratch

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

    # ------------------------------------------------------------------ grammars

    def grammar(self, gbnf: str, root: str = "root") -> Grammar:
        """A grammar sampler for one generating sequence (GBNF text, start rule `root`);
        BadRequest if llama.cpp refuses the grammar. May be called from any thread (like
        `tokenize`, so a request can be refused before it is queued); the Grammar is then
        used on the engine thread only. The first call also scans the vocabulary for
        control tokens (`_Candidates`)."""
        if not gbnf.strip():  # llama.cpp takes an empty grammar as "no constraint at all"
            raise BadRequest("the grammar is empty")
        with self._vocab_lock:  # `close` must not free the vocabulary meanwhile
            if self.model is None:
                raise ModelNotReady("the model was unloaded (an engine reload); retry")
            errors: list[str] = []
            _captured.errors = errors
            try:
                sampler = C.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"),
                                                       root.encode("utf-8"))
            finally:
                _captured.errors = None
            if not sampler:
                # a syntax error's details go to stderr (llama.cpp prints them itself);
                # the other refusals (no such start rule, left recursion) come through
                # its log
                detail = "; ".join(e for e in errors if e and e != "failed to parse grammar")
                detail = detail or "a syntax error or an undefined rule"
                raise BadRequest(f"invalid grammar (start rule {root!r}): {detail}")
            if self._candidates is None:
                self._candidates = _Candidates(self)
            grammar = Grammar(self, sampler, self._candidates)
            self._grammars.add(grammar)
            return grammar

    def close(self) -> None:
        with self._vocab_lock:
            self._free()

    def _free(self) -> None:
        for grammar in list(self._grammars):  # their samplers point into the vocabulary
            grammar.close()
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            C.llama_model_free(self.model)
            self.model = None


# ---------------------------------------------------------------------- grammars

# llama_token_data {int32 id; float logit; float p} as a numpy record
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)

_apply = C.llama_sampler_apply
_NEG_INF = -math.inf


def _records(n: int) -> tuple[npt.NDArray[np.void], Any]:
    """n zeroed token-data records and a llama_token_data_array (size n) pointing at them."""
    records = np.zeros(n, dtype=_TOKEN_DATA)
    array = C.llama_token_data_array(
        data=ctypes.cast(records.ctypes.data, C.llama_token_data_p),
        size=n, selected=-1, sorted=False)
    return records, array


class _Candidates:
    """What a backend's grammars share (they all run on the engine thread, one call at a
    time, and a grammar sampler only writes logits): the whole vocabulary as token-data
    records (ids filled once) for `mask`, a small record array for `allowed`, and which
    tokens are control tokens.

    A control token (other than end-of-generation) renders as nothing in the answer
    (`Backend.piece`), but llama.cpp's grammar reads it as its spelled name: inside a JSON
    string it would accept `<start_of_turn>` as 15 characters of text. The grammars forbid
    those tokens so that what the grammar checks is the text the client gets. Finding them
    takes one pass over the vocabulary (about 0.2 s for 262,144 tokens), on first use."""

    def __init__(self, backend: Backend) -> None:
        n = backend.n_vocab
        self.records, self.array = _records(n)
        self.records["id"] = np.arange(n, dtype=np.int32)
        self.logit = self.records["logit"]  # a strided float32 view
        self.ref = ctypes.byref(self.array)
        self.subset, self.subset_array = _records(256)
        vocab = backend.vocab
        blocked = np.fromiter((C.llama_vocab_is_control(vocab, t) for t in range(n)),
                              dtype=np.bool_, count=n)
        for t in np.flatnonzero(blocked).tolist():
            if backend.is_eog(t):
                blocked[t] = False
        self.blocked = blocked
        self.blocked_ids = np.flatnonzero(blocked)

    def subset_records(self, n: int) -> npt.NDArray[np.void]:
        if n > len(self.subset):
            self.subset, self.subset_array = _records(max(n, 2 * len(self.subset)))
        self.subset_array.size = n
        return self.subset


class Grammar:
    """llama.cpp's grammar sampler for one generating sequence (made by `Backend.grammar`).

    Engine thread only. The usual step: sample from the raw row; if `allows(token)` says
    no, restrict the row (`mask_top` for a sampler that keeps its top k, else `mask`) and
    sample again; then `accept(token)`. End-of-generation tokens are allowed only where the
    grammar may end, and once it must end they are the only tokens allowed.
    """

    def __init__(self, backend: Backend, sampler: Any, candidates: _Candidates) -> None:
        self._backend = backend
        self._sampler: Any = sampler
        self._candidates = candidates
        self._blocked = candidates.blocked
        self._n_vocab = backend.n_vocab
        # a one-token candidate array for `allows`
        self._one: Any = C.llama_token_data(id=0, logit=0.0, p=0.0)
        self._one_array = C.llama_token_data_array(
            data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False)
        self._one_ref = ctypes.byref(self._one_array)
        self._allowed = -1  # the last token `allows` said yes to (since the last accept)

    def _live(self) -> Any:
        sampler = self._sampler
        if sampler is None:
            if self._backend.model is None:
                raise ModelNotReady("the model was unloaded (an engine reload); retry")
            raise ValueError("the grammar was closed")
        return sampler

    def allows(self, token: int) -> bool:
        """May `token` come next? (the grammar sampler on a one-token candidate array)"""
        sampler = self._live()
        if not 0 <= token < self._n_vocab:  # llama.cpp would throw (and abort) on it
            raise ValueError(f"token {token} is outside the vocabulary")
        if self._blocked[token]:
            return False
        one = self._one
        one.id = token
        one.logit = 0.0
        _apply(sampler, self._one_ref)
        if one.logit == _NEG_INF:
            return False
        self._allowed = token
        return True

    def allowed(self, tokens: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which of `tokens` may come next (one grammar call for all of them): cheaper than
        `mask` when the sampler only looks at its top candidates anyway."""
        sampler = self._live()
        ids = np.asarray(tokens, dtype=np.int32).ravel()
        n = len(ids)
        if n == 0:
            return np.zeros(0, dtype=np.bool_)
        if int(ids.min()) < 0 or int(ids.max()) >= self._n_vocab:
            raise ValueError("a token is outside the vocabulary")
        c = self._candidates
        records = c.subset_records(n)
        records["id"][:n] = ids
        records["logit"][:n] = 0.0
        _apply(sampler, ctypes.byref(c.subset_array))
        ok: npt.NDArray[np.bool_] = records["logit"][:n] != _NEG_INF
        ok &= ~self._blocked[ids]
        return ok

    def mask(self, logits: npt.NDArray[np.float32]) -> None:
        """Set every token the grammar forbids next to -inf in `logits` (a whole float32
        row, edited in place). This checks every token of the vocabulary: about 0.1 s for
        262,144 tokens, more inside a string (see benchmarks/bench_grammar.py)."""
        sampler = self._live()
        c = self._candidates
        if logits.shape != c.logit.shape:
            raise ValueError(f"a logits row of {c.logit.shape[0]} entries is expected, "
                             f"got shape {logits.shape}")
        np.copyto(c.logit, logits)
        _apply(sampler, c.ref)
        np.copyto(logits, c.logit)
        logits[c.blocked_ids] = _NEG_INF

    def mask_top(self, logits: npt.NDArray[np.float32], k: int, exact: bool = True) -> None:
        """Keep the `k` best tokens the grammar allows (fewer if fewer exist) with their
        logits and set every other entry of the row to -inf, in place.

        For a sampler that only draws from its top `k` candidates (greedy: k = 1) this
        gives the same candidates as `mask`, usually for the price of one argpartition and
        one grammar call on a few dozen tokens: the best candidates are checked first, in
        widening rounds, and the whole row is masked only when too few of them pass.

        `exact=False` never masks the whole row (tens of milliseconds, which would stall
        every slot of the batch) when the widest round found at least one allowed token:
        the candidates are then the allowed ones among the 16,384 most likely tokens (at a
        structural position with fewer than `k` allowed tokens, those past that rank have
        a negligible share of the probability)."""
        c = self._candidates
        if logits.shape != c.logit.shape:
            raise ValueError(f"a logits row of {c.logit.shape[0]} entries is expected, "
                             f"got shape {logits.shape}")
        n = len(logits)
        k = max(1, k)
        m = max(64, 4 * k)
        while m < n // 4:
            top = np.argpartition(logits, n - m)[n - m:]
            ok = self.allowed(top)
            found = int(ok.sum())
            if found >= k or (not exact and found and m * 16 >= n // 4):
                keep = top[ok]
                if len(keep) > k:
                    keep = keep[np.argpartition(logits[keep], len(keep) - k)[len(keep) - k:]]
                values = logits[keep]
                logits.fill(_NEG_INF)
                logits[keep] = values
                return
            m *= 16
        self.mask(logits)
        if k < n:
            allowed = np.flatnonzero(np.isfinite(logits))
            if len(allowed) > k:
                drop = np.argpartition(logits[allowed], len(allowed) - k)[:len(allowed) - k]
                logits[allowed[drop]] = _NEG_INF

    def accept(self, token: int) -> None:
        """Advance the grammar past `token`. A token the grammar forbids raises ValueError
        (llama.cpp would abort the whole process on it)."""
        sampler = self._live()
        if token != self._allowed and not self.allows(token):
            raise ValueError(f"token {token} is not allowed by the grammar here")
        self._allowed = -1
        C.llama_sampler_accept(sampler, token)

    def close(self) -> None:
        """Free the sampler (idempotent; the backend's close frees its grammars first)."""
        sampler, self._sampler = self._sampler, None
        if sampler:
            C.llama_sampler_free(sampler)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


# Any JSON object, for OpenAI's response_format {"type": "json_object"}. The answer starts
# with "{" and ends with its matching "}" (nothing before, nothing after). Whitespace between
# tokens is at most one space, or one line break and up to 16 spaces or tabs, so the model
# cannot run on in blanks; numbers have at most 16 digits before and after the point.
JSON_OBJECT_GBNF = r"""
root   ::= object
object ::= "{" ws ( member ( "," ws member )* )? "}"
member ::= string ws ":" ws value ws
array  ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
value  ::= object | array | string | number | "true" | "false" | "null"
string ::= "\"" char* "\""
char   ::= [^"\\\x00-\x1F\x7F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
number ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?
ws     ::= ( " " | "\n" [ \t]{0,16} )?
"""

# The converter's rules for one character of a JSON string, and for "." in a `pattern`,
# let raw control characters (a line break, a tab) into strings, and "." even lets in a
# quote or a backslash: json.loads refuses the result. These replace them.
_STRICT_RULES = {
    "char": r'[^"\\\x00-\x1F\x7F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
    "dot": r'[^"\\\x00-\x1F\x7F]',
}


def json_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF for a JSON answer: any object when `schema` is None (response_format
    json_object), else text that matches the JSON schema (json_schema).

    Schemas are converted by llama-cpp-python's own converter,
    `llama_cpp.llama_grammar.json_schema_to_gbnf` (a port of llama.cpp's
    json-schema-to-grammar.py), with its string-character rules made strict (see
    `_STRICT_RULES`). It handles: type (also a list of types), properties, required (the
    other properties are optional; they come in the schema's order), additionalProperties
    (extra keys only when it is true or a schema), nested objects and arrays, items,
    prefixItems, minItems, maxItems, enum, const, anyOf, oneOf (as anyOf), allOf (of
    objects), local $ref ("#/..."), minLength, maxLength, pattern ("^...$"), and the string
    formats date, time, date-time and uuid. It ignores, without an error: minimum, maximum,
    exclusiveMinimum/Maximum, multipleOf, uniqueItems, min/maxProperties, patternProperties,
    not, if/then/else, and other string formats (email, uri...). What it cannot convert
    (an unknown type, a remote or malformed $ref, a pattern without ^ and $) raises
    BadRequest.
    """
    if schema is None:
        return JSON_OBJECT_GBNF
    if not isinstance(schema, dict):
        raise BadRequest("a JSON schema must be a JSON object")
    _check_refs(schema)
    try:
        gbnf = str(json_schema_to_gbnf(json.dumps(schema)))
    except RecursionError as e:
        raise BadRequest("the JSON schema is nested too deeply") from e
    except Exception as e:  # the converter validates with asserts and lookups
        detail = (str(e) or type(e).__name__).replace("stdin#/", "#/")  # its base URL
        if len(detail) > 200:
            detail = detail[:200] + "..."
        raise BadRequest(f"unsupported JSON schema: {detail}") from e
    lines = gbnf.split("\n")
    for i, line in enumerate(lines):
        name, sep, _rule = line.partition(" ::= ")
        if sep and name in _STRICT_RULES:
            lines[i] = f"{name} ::= {_STRICT_RULES[name]}"
    return "\n".join(lines) + "\n"


def _check_refs(node: Any, depth: int = 0) -> None:
    """Only local references: the converter would fetch an https $ref over the network
    when Python runs with -O (its refusal is an assert)."""
    if depth > 200:
        raise BadRequest("the JSON schema is nested too deeply")
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
            raise BadRequest(f"unsupported JSON schema: only local references ('#/...') are "
                             f"supported, not $ref {str(ref)[:100]!r}")
        for value in node.values():
            _check_refs(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_refs(value, depth + 1)
