"""A deterministic stand-in for the llama.cpp backend, for tests about scheduling and protocol.

`ScriptedBackend` implements the interface the scheduler uses (engine.batch.ModelBackend).
Every sequence generates the same scripted pieces, one per engine step, whatever its prompt:

    backend = ScriptedBackend(script=[b"Hel", b"lo \\xf0\\x9f", b"\\x98\\x80", b"!"])
    engine = Engine(backend, parallel=2, n_ctx_slot=256, n_batch=32, queue_size=4)
    engine.start()
    gen = engine.submit(GenerationRequest(engine.tokenize("hi", True), SamplingParams()))
    # pieces streamed: "Hel", "lo ", "😀", "!"   (the emoji's bytes are split across tokens)
    # finish: reason "stop" (end-of-generation after the script), text "Hello 😀!"

How: the vocabulary is [BOS, EOG, the 256 byte values, one token per script step]. The logits
after any prompt token put all the mass on script step 0; after script step j on step j + 1;
after the last step on EOG (`eog_after=True`) or back on step 0 (`eog_after=False`, so the
answer ends by n_predict or an anti-prompt). Any temperature/top-k/top-p picks the same token.

`tokenize` maps text to BOS + one token per UTF-8 byte. The backend checks that the scheduler
keeps each sequence's positions contiguous (a decode at a wrong position fails with -1) and
records every decode call in `calls` as a list of (seq_id, token, pos, wants_logits).

Knobs for timing-free tests: `gate` (a threading.Semaphore) makes every decode wait for one
release, so a test advances the engine step by step; `fail_token` makes any decode containing
that token id fail with -1 (the decode-error path).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from lollms_fast.config import Config
from lollms_fast.engine import Engine
from lollms_fast.engine.batch import Batch

BOS, EOG = 0, 1
BYTE0 = 2  # token id of byte value 0
SCRIPT0 = BYTE0 + 256  # token id of script step 0
_LOW = -1e4  # exp(_LOW - 0) is 0.0 in double: no sampler can pick these


class ScriptedBackend:
    def __init__(self, script: Sequence[bytes], *, eog_after: bool = True,
                 gate: threading.Semaphore | None = None, fail_token: int | None = None) -> None:
        if not script:
            raise ValueError("the script needs at least one piece")
        self.script = [bytes(p) for p in script]
        self.eog_after = eog_after
        self.gate = gate
        self.fail_token = fail_token
        self.n_vocab = SCRIPT0 + len(self.script)
        self.calls: list[list[tuple[int, int, int, bool]]] = []
        self.kv: dict[int, list[int]] = {}  # seq_id -> tokens at positions 0..
        self.closed = False
        self.states_saved = 0
        self.states_restored = 0
        self._rows: dict[int, int] = {}  # batch index -> next token, for the last decode

    # token ids of the script, for assertions
    def script_token(self, step: int) -> int:
        return SCRIPT0 + step

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:  # noqa: ARG002
        # the scripted vocabulary has no spelled control tokens: parse_special changes nothing
        return ([BOS] if add_special else []) + [BYTE0 + b for b in text.encode("utf-8")]

    def decode(self, batch: Batch) -> int:
        if self.gate is not None:
            self.gate.acquire()
        call = [(int(batch.seq[i]), int(batch.token[i]), int(batch.pos[i]),
                 bool(batch.logits[i])) for i in range(batch.n)]
        self.calls.append(call)
        if self.fail_token is not None and any(t == self.fail_token for _, t, _, _ in call):
            return -1
        expected = {s: len(toks) for s, toks in self.kv.items()}
        for seq, _, pos, _ in call:
            if pos != expected.get(seq, 0):
                return -1  # a scheduler bug: positions must continue the sequence
            expected[seq] = pos + 1
        self._rows = {}
        for i, (seq, token, _, wants) in enumerate(call):
            self.kv.setdefault(seq, []).append(token)
            if wants:
                self._rows[i] = self._next_after(token)
        return 0

    def _next_after(self, token: int) -> int:
        if token < SCRIPT0:
            return SCRIPT0
        step = token - SCRIPT0 + 1
        if step < len(self.script):
            return SCRIPT0 + step
        return EOG if self.eog_after else SCRIPT0

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        row = np.full(self.n_vocab, _LOW, dtype=np.float32)
        row[self._rows[index]] = 0.0
        return row

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        toks = self.kv.get(seq_id, [])
        start = max(p0, 0)
        end = len(toks) if p1 < 0 else p1
        del toks[start:end]
        return True

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        """Share `src`'s positions [p0, p1) with `dst` (here: copy its tokens; the
        scheduler only copies whole sequences into empty ones)."""
        toks = self.kv.get(src, [])
        start = max(p0, 0)
        end = len(toks) if p1 < 0 else p1
        assert not self.kv.get(dst) and start == 0, "seq_cp into a non-empty sequence"
        self.kv[dst] = list(toks[start:end])

    def state_get(self, seq_id: int) -> bytearray:
        """A sequence's "KV state": its tokens, as the KV tiers store states."""
        self.states_saved += 1
        return bytearray(np.asarray(self.kv.get(seq_id, []), dtype="<i4").tobytes())

    def state_set(self, seq_id: int, data: bytearray) -> bool:
        self.states_restored += 1
        if len(data) % 4:
            self.kv[seq_id] = []
            return False
        self.kv[seq_id] = [int(t) for t in np.frombuffer(bytes(data), dtype="<i4")]
        return True

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def piece(self, token: int) -> bytes:
        if token >= SCRIPT0:
            return self.script[token - SCRIPT0]
        if token >= BYTE0:
            return bytes([token - BYTE0])
        return b""

    def close(self) -> None:
        self.closed = True


def scripted_loader(script: Sequence[bytes], **kw: Any) -> Callable[[Config], Engine]:
    """A `build_app` backend factory: an engine on a ScriptedBackend(script, **kw)."""
    def load(config: Config) -> Engine:
        engine = Engine(ScriptedBackend(script, **kw), parallel=config.parallel,
                        n_ctx_slot=config.ctx_size, n_batch=config.n_batch,
                        queue_size=config.queue_size)
        engine.start()
        return engine
    return load
