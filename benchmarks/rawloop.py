"""The floor and the ceiling for this stack: minimal loops over llama-cpp-python's low-level API.

Nothing of lollms_fast is used here, so these loops measure what llama.cpp itself costs:
`greedy` decodes one sequence token by token (argmax in numpy), `batched_greedy` decodes B
sequences with one llama_decode per step. Other benchmarks import `RawContext`.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llama_cpp import llama_cpp as C


@C.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


@dataclass
class RawRun:
    tokens: list[list[int]]  # generated tokens per sequence (EOG excluded)
    prompt_s: float  # prompt decoding
    decode_s: float  # from the first generated token to the last

    @property
    def n_generated(self) -> int:
        return sum(len(t) for t in self.tokens)


class RawContext:
    """One model and context, created the way lollms_fast's backend creates its own."""

    def __init__(self, model_path: Path, *, n_ctx: int, n_batch: int = 512, n_threads: int = 2,
                 n_seq_max: int = 1) -> None:
        C.llama_log_set(_quiet, ctypes.c_void_p(0))
        C.llama_backend_init()
        self.model = C.llama_model_load_from_file(str(model_path).encode(),
                                                  C.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"cannot load {model_path}")
        p = C.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, n_seq_max
        p.n_threads = p.n_threads_batch = n_threads
        p.kv_unified, p.swa_full, p.no_perf = True, True, True
        self.ctx = C.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("cannot create the context")
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.batch = C.llama_batch_init(n_batch, 0, n_seq_max)
        self._row = ctypes.c_float * self.n_vocab

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (C.llama_token * (len(data) + 8))()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, True)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        return buf.raw[:n]

    def text(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def clear(self) -> None:
        C.llama_memory_clear(C.llama_get_memory(self.ctx), True)

    def logits(self, index: int) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self.ctx, index)
        address = ctypes.cast(ptr, ctypes.c_void_p).value
        return np.frombuffer(self._row.from_address(address), dtype=np.float32)

    def _fill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (token, pos, seq, want) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(entries)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        self._fill(entries)
        rc = C.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def prefill(self, prompt: list[int], seq: int) -> None:
        for start in range(0, len(prompt), self.n_batch):
            chunk = prompt[start:start + self.n_batch]
            last = start + len(chunk) == len(prompt)
            self.decode([(t, start + i, seq, last and i == len(chunk) - 1)
                         for i, t in enumerate(chunk)])

    def greedy(self, prompt: list[int], n_predict: int) -> RawRun:
        return self.batched_greedy([prompt], n_predict)

    def batched_greedy(self, prompts: list[list[int]], n_predict: int) -> RawRun:
        """Greedy decoding of every prompt in its own sequence, all in one batch per step;
        a sequence stops at EOG or n_predict."""
        self.clear()
        t0 = time.perf_counter()
        # each prompt decoded on its own: its last token's logits are output index -1
        first: list[int] = []
        for seq, prompt in enumerate(prompts):
            self.prefill(prompt, seq)
            first.append(int(np.argmax(self.logits(-1))))
        t1 = time.perf_counter()
        out: list[list[int]] = [[] for _ in prompts]
        pos = [len(p) for p in prompts]
        live = [seq for seq, tok in enumerate(first) if not C.llama_vocab_is_eog(self.vocab, tok)]
        nxt = dict(enumerate(first))
        while live:
            for seq in live:
                out[seq].append(nxt[seq])
            live = [seq for seq in live if len(out[seq]) < n_predict]
            if not live:
                break
            self.decode([(nxt[seq], pos[seq], seq, True) for seq in live])
            still = []
            for i, seq in enumerate(live):
                pos[seq] += 1
                token = int(np.argmax(self.logits(i)))
                if not C.llama_vocab_is_eog(self.vocab, token):
                    nxt[seq] = token
                    still.append(seq)
            live = still
        return RawRun(out, t1 - t0, time.perf_counter() - t1)

    def close(self) -> None:
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)
        C.llama_model_free(self.model)
