"""What the scheduler hands a backend: a reusable token batch, and the backend interface.

The batch lives in numpy arrays allocated once; the llama.cpp backend points a `llama_batch`
at them (no per-step allocation, no per-token ctypes writes) and the scripted test backend
reads them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt


class Batch:
    """Tokens of several sequences for one decode call; every token belongs to one sequence."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)  # 1: output this token's logits
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, seq_id: int, tokens: Sequence[int], pos0: int, want_logits: bool) -> int:
        """Append `tokens` of one sequence at positions pos0...; logits for the last one if
        asked. Returns the batch index of the last token (what `Backend.logits` takes)."""
        start, k = self.n, len(tokens)
        end = start + k
        if k == 0 or end > self.capacity:
            raise ValueError(f"batch overflow: {end} > {self.capacity} tokens")
        if k == 1:  # the common case of a generating slot: scalar writes are cheaper
            self.token[start] = tokens[0]
            self.pos[start] = pos0
            self.seq[start] = seq_id
        else:
            self.token[start:end] = tokens
            self.pos[start:end] = np.arange(pos0, pos0 + k, dtype=np.int32)
            self.seq[start:end] = seq_id
            self.logits[start:end - 1] = 0
        self.logits[end - 1] = 1 if want_logits else 0
        self.n = end
        return end - 1


class ModelBackend(Protocol):
    """The interface the scheduler uses (engine.backend.Backend, tests.fakes.ScriptedBackend)."""

    n_vocab: int

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]: ...

    def decode(self, batch: Batch) -> int:
        """llama_decode's return code: 0 ok, 1 no KV room, < 0 error (state restored or
        partially written; the scheduler removes the positions it added on failure)."""
        ...

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        """The writable float32 logits row of batch index `index` of the last decode."""
        ...

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool: ...

    def is_eog(self, token: int) -> bool: ...

    def piece(self, token: int) -> bytes: ...

    def close(self) -> None: ...


class StatefulBackend(ModelBackend, Protocol):
    """A backend whose sequences can be saved and restored (the KV tiers need it)."""

    def state_get(self, seq_id: int) -> bytearray: ...

    def state_set(self, seq_id: int, data: bytearray) -> bool: ...
