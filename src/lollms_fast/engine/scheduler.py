"""Continuous batching: one engine thread owns the model context and every slot.

Each step: cancelled requests end; waiting requests take idle slots (the one whose cached
tokens share the longest prefix with the prompt, so only the suffix is decoded); one batch
gets every generating slot's last token plus bounded chunks of the prompts still being read;
one decode; each slot whose logits came out samples its next token (native sampler) and
feeds its bytes to its stop detector (native). What the step produced crosses to asyncio in
one `call_soon_threadsafe` per event loop.

Threads: `submit`, `cancel`, `tokenize` and `stats` may run anywhere; everything touching the
backend or a slot runs on the engine thread. A failing request ends with reason "error"; the
engine keeps serving the others.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

from .._native import sampling, stops
from ..errors import BadRequest, Busy, ModelNotReady
from . import kvcache
from .batch import Batch, ModelBackend, StatefulBackend
from .kvcache import KVCache
from .metrics import EngineMetrics
from .types import FinishReason, TokenLogprob

log = logging.getLogger("lollms_fast.engine")



@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 0.95
    repeat_penalty: float = 1.2
    repeat_last_n: int = 40
    seed: int = -1  # -1: a random seed per request
    n_predict: int = 1024
    presence_penalty: float = 0.0  # subtracted once from tokens in the penalty window
    frequency_penalty: float = 0.0  # subtracted per occurrence in the window
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    n_probs: int = -1  # >= 0: report each token's logprob and this many alternatives


@dataclass(frozen=True)
class GenerationRequest:
    tokens: Sequence[int]  # the whole prompt, BOS included
    params: SamplingParams
    anti_prompts: tuple[str, ...] = ()
    stops_case_sensitive: bool = False  # lollms anti-prompts ignore ASCII case; OpenAI's not
    grammar: str | None = None  # GBNF the answer must follow (llama.cpp's grammar sampler)


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    error: str | None  # the message when reason is ERROR
    n_prompt: int
    n_reused: int  # prompt tokens taken from the slot's cached prefix (not decoded)
    n_generated: int  # tokens sampled
    text: str  # the whole answer, anti-prompt cut off


# a stored prefix is restored when it saves at least this many tokens over the slot's own
RESTORE_GAIN = 32
# a slot whose cache holds at least half of a new prompt (and this many tokens) is taken for
# it even when most of its cache is another conversation's
MIN_SHARED_PROMPT = 16
# a grammar that refuses the sampled token leaves at most this many candidates when the
# request samples without top-k (masking the whole vocabulary costs tens of milliseconds)
GRAMMAR_CANDIDATES = 256


class TokenSampler(Protocol):
    """What a slot samples with (the native Sampler; tests pass their own)."""

    def accept(self, token: int) -> None: ...

    def sample(self, logits: npt.NDArray[np.float32]) -> int: ...


class GrammarMatcher(Protocol):
    """One sequence's grammar state (engine.backend.Grammar)."""

    def allows(self, token: int) -> bool: ...

    def mask(self, logits: npt.NDArray[np.float32]) -> None: ...

    def mask_top(self, logits: npt.NDArray[np.float32], k: int, exact: bool = True
                 ) -> None: ...

    def accept(self, token: int) -> None: ...

    def close(self) -> None: ...


class SequenceCopyBackend(ModelBackend, Protocol):
    """A backend that can share a sequence's cells with another (n > 1 choices)."""

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...


class GrammarBackend(ModelBackend, Protocol):
    """A backend that can constrain sampling with a grammar."""

    def grammar(self, gbnf: str) -> GrammarMatcher: ...


SamplerFactory = Callable[[GenerationRequest], TokenSampler]


def default_sampler(request: GenerationRequest) -> TokenSampler:
    p = request.params
    seed = p.seed if p.seed >= 0 else secrets.randbits(64)
    s = sampling.Sampler(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                         repeat_penalty=p.repeat_penalty, repeat_last_n=p.repeat_last_n,
                         seed=seed, presence_penalty=p.presence_penalty,
                         frequency_penalty=p.frequency_penalty,
                         logit_bias=p.logit_bias or None)
    if p.repeat_last_n > 0:  # the prompt's tail counts as "recent" for the repeat penalty
        s.accept_many(request.tokens[-p.repeat_last_n:])
    return s


class Generation:
    """One submitted request: an async stream of new text, a cancel switch and the finish."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 wake: Callable[[], None]) -> None:
        self.request = request
        self.finish: Finish | None = None
        self.cancelled = False  # read by the engine thread between steps
        self.submitted_at = time.monotonic()
        self._loop = loop
        self._wake = wake
        self._pieces: deque[str] = deque()
        self._logprobs: list[TokenLogprob] = []
        self._waiter: asyncio.Future[None] | None = None
        self._done = asyncio.Event()
        # the other choices of an n > 1 request: they start from this one's prompt KV
        self.followers: list[Generation] = []

    def cancel(self) -> None:
        if not self.cancelled and self.finish is None:
            self.cancelled = True
            self._wake()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            if self._pieces:
                yield self._pieces.popleft()
            elif self.finish is not None:
                return
            else:
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None

    async def wait(self) -> Finish:
        await self._done.wait()
        assert self.finish is not None
        return self.finish

    def take_logprobs(self) -> list[TokenLogprob]:
        """The token logprobs received since the last call (requests with n_probs >= 0)."""
        taken, self._logprobs = self._logprobs, []
        return taken

    def _push(self, text: str, finish: Finish | None,
              logprobs: list[TokenLogprob] | None = None) -> None:
        """On the event loop: one engine step's text (and the finish, at the end)."""
        if logprobs:
            self._logprobs.extend(logprobs)
        if text:
            self._pieces.append(text)
        if finish is not None:
            self.finish = finish
            self._done.set()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class SlotState(Enum):
    IDLE = 0
    PROMPT = 1  # decoding the prompt, chunk by chunk
    GENERATING = 2
    FOLLOWING = 3  # another choice of an n > 1 request: waits for the leader's prompt


@dataclass(slots=True)
class _Update:
    """What one engine step produced for one request: new text, and the finish if it ended."""

    text: str
    finish: Finish | None
    logprobs: list[TokenLogprob] | None = None


class _Slot:
    """One sequence (its own KV stream). `cached` mirrors the positions held there."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.state = SlotState.IDLE
        self.cached: list[int] = []  # tokens at positions 0.. of this sequence's KV
        self.admitted = 0  # admission number (prompts are read oldest first)
        self.gen: Generation | None = None
        self.pending: Sequence[int] = ()  # prompt tokens still to decode
        self.next_token = -1  # sampled, not yet decoded
        self.sampler: TokenSampler | None = None
        self.detector: stops.StopDetector | None = None
        self.grammar: GrammarMatcher | None = None
        # FOLLOWING slots (and their requests) waiting for this one's prompt
        self.followers: list[tuple[_Slot, Generation]] = []
        self.parts: list[str] = []
        self.n_prompt = 0
        self.n_reused = 0
        self.n_generated = 0
        self.last_token_at = 0.0  # monotonic time of its last sampled token


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class Engine:
    def __init__(self, backend: ModelBackend, *, parallel: int, n_ctx_slot: int, n_batch: int,
                 queue_size: int, sampler_factory: SamplerFactory = default_sampler,
                 metrics: EngineMetrics | None = None, kv_cache: KVCache | None = None
                 ) -> None:
        if parallel < 1 or n_batch < 1 or n_ctx_slot < 2:
            raise ValueError("parallel, n_batch >= 1 and n_ctx_slot >= 2 are required")
        self.backend = backend
        self.parallel = parallel
        self.n_ctx_slot = n_ctx_slot
        self.n_batch = n_batch
        self.queue_size = queue_size
        self._sampler_factory = sampler_factory
        self._slots = [_Slot(i) for i in range(parallel)]
        self._batch = Batch(n_batch)
        self._cond = threading.Condition()
        self._waiting: deque[Generation] = deque()  # guarded by _cond
        self._outstanding = 0  # submitted, not finished; guarded by _cond
        self._closing = False
        self._drop_cache = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._admissions = 0
        self._updates: dict[Generation, _Update] = {}  # what this step produced, per request
        self._scratch: npt.NDArray[np.float32] | None = None  # grammar sampling's row copy
        self._totals = {"prompt_decoded": 0, "prompt_reused": 0, "generated": 0, "steps": 0,
                        "requests": 0, "errors": 0, "grammar_masks": 0}
        # for /metrics; an app shares one across reloads (set before the engine serves)
        self.metrics = metrics or EngineMetrics()
        # RAM and disk tiers behind the slots (None: a slot's cache dies with it); the
        # backend must then implement StatefulBackend
        self.kv_cache = kv_cache

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lollms-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Blocking: cancel everything, stop the engine thread, free the model."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            self._shutdown()
        if self.kv_cache is not None:
            self.kv_cache.close()  # waits for the files being written
        self.backend.close()

    def submit(self, request: GenerationRequest) -> Generation:
        return self.submit_choices(request, 1)[0]

    def submit_choices(self, request: GenerationRequest, n: int) -> list[Generation]:
        """`n` answers to one prompt. The prompt is decoded once, by the first; the others
        take slots at the same time and start from a copy of its KV (llama_memory_seq_cp)
        and of its last logits row. With a fixed seed, choice i samples with seed + i."""
        count = len(request.tokens)
        if count == 0:
            raise BadRequest("the prompt is empty")
        if count >= self.n_ctx_slot:
            raise BadRequest(f"the prompt has {count} tokens; a slot holds {self.n_ctx_slot} "
                             f"(prompt and answer together)")
        if not 1 <= n <= self.parallel:
            raise BadRequest(f"n must be between 1 and {self.parallel} (the parallel slots)")
        loop = asyncio.get_running_loop()
        generations = [Generation(request if i == 0 or request.params.seed < 0 else
                                  replace(request, params=replace(
                                      request.params, seed=request.params.seed + i)),
                                  loop, self._wake) for i in range(n)]
        leader = generations[0]
        leader.followers = generations[1:]
        with self._cond:
            if self._closing:
                raise ModelNotReady("the engine is shutting down")
            if self._outstanding + n > self.parallel + self.queue_size:
                raise Busy(f"all {self.parallel} slots and the {self.queue_size} places of "
                           f"the wait queue are taken; retry later")
            self._outstanding += n
            self._waiting.append(leader)
            self._cond.notify()
        return generations

    def tokenize(self, text: str, add_bos: bool, parse_special: bool = False) -> list[int]:
        return self.backend.tokenize(text, add_bos, parse_special)

    def stats(self) -> dict[str, int]:
        with self._cond:
            queued = len(self._waiting)
        busy = sum(1 for s in self._slots if s.gen is not None)
        reading = sum(1 for s in self._slots if s.state is SlotState.PROMPT)
        return {"slots": self.parallel, "slots_busy": busy, "slots_reading": reading,
                "slots_generating": busy - reading, "queued": queued, **self._totals}

    @property
    def running(self) -> bool:
        """The engine thread is alive (False before start and after close or a crash)."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def drop_cache(self) -> None:
        """Idle slots forget their cached prefixes before the next admission (benchmarks
        use it to compare cold runs; it frees nothing, the cells are reused anyway)."""
        with self._cond:
            self._drop_cache = True
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._waiting or self._drop_cache
                           or self._any_active()):
                    self._cond.wait()
                if self._closing:
                    break
                drop, self._drop_cache = self._drop_cache, False
                admitted = self._take_admissible()
            try:
                if drop:
                    for slot in self._slots:
                        if slot.gen is None:
                            self._reset_kv(slot)
                self._admit(admitted)
                self._step()
            except Exception as exc:  # a bug must not stop the engine: fail the active ones
                log.exception("engine step failed")
                for slot in self._slots:
                    if slot.gen is not None:
                        self._reset_kv(slot)
                        self._end(slot, FinishReason.ERROR,
                                  f"engine failure: {type(exc).__name__}: {exc}")
            self._deliver()
        self._shutdown()

    def _any_active(self) -> bool:
        return any(s.gen is not None for s in self._slots)

    def _take_admissible(self) -> list[Generation]:
        free = sum(1 for s in self._slots if s.gen is None)
        taken: list[Generation] = []
        # first come, first served: a request with n choices waits for n free slots
        while self._waiting and 1 + len(self._waiting[0].followers) <= free:
            gen = self._waiting.popleft()
            taken.append(gen)
            free -= 1 + len(gen.followers)
        # cancelled while queued: they never take a slot
        for g in [g for g in self._waiting if g.cancelled]:
            self._waiting.remove(g)
            taken.append(g)
        return taken

    def _admit(self, generations: list[Generation]) -> None:
        for gen in generations:
            tokens = gen.request.tokens
            if gen.cancelled:  # its choices go with it (they were to share its prompt)
                for g in (gen, *gen.followers):
                    self._finish_unslotted(g, FinishReason.CANCELLED, None)
                continue
            slot = self._pick_slot(tokens)
            # at least the last prompt token is decoded: its logits give the first answer token
            reuse = min(common_prefix_len(slot.cached, tokens), len(tokens) - 1)
            if self.kv_cache is not None:
                reuse = self._use_tiers(slot, tokens, reuse)
            if reuse < len(slot.cached) and not self.backend.seq_rm(slot.seq_id, reuse, -1):
                self._reset_kv(slot)  # this cache cannot be cut at a position
                reuse = 0
            del slot.cached[reuse:]
            self._totals["requests"] += 1 + len(gen.followers)
            self._occupy(slot, gen, SlotState.PROMPT)
            if slot.gen is not gen:  # unusable parameters: the choices fail with it
                for g in gen.followers:
                    self._finish_unslotted(g, FinishReason.ERROR, "bad sampling parameters")
                continue
            slot.pending = tokens[reuse:]
            slot.n_reused = reuse
            slot.followers = []
            for follower in gen.followers:
                other = self._pick_slot(tokens)
                self._save_slot(other, 0)
                self._reset_kv(other)  # it will hold a copy of the leader's sequence
                self._occupy(other, follower, SlotState.FOLLOWING)
                if other.gen is follower:
                    slot.followers.append((other, follower))
            self._totals["prompt_reused"] += reuse
            self.metrics.admitted(len(tokens), reuse)
            for _ in slot.followers:  # the choices' prompts are shared, not decoded
                self.metrics.admitted(len(tokens), len(tokens))

    def _occupy(self, slot: _Slot, gen: Generation, state: SlotState) -> None:
        """Give `slot` to `gen`: its sampler, stop detector and grammar (a request whose
        parameters cannot be used ends with an error at once)."""
        self._admissions += 1
        slot.admitted = self._admissions
        slot.gen = gen
        slot.state = state
        slot.pending = ()
        slot.n_prompt, slot.n_reused, slot.n_generated = len(gen.request.tokens), 0, 0
        slot.parts = []
        request = gen.request
        try:
            slot.sampler = self._sampler_factory(request)
            slot.detector = stops.StopDetector(request.anti_prompts,
                                               case_sensitive=request.stops_case_sensitive)
            if request.grammar is not None:
                slot.grammar = cast(GrammarBackend, self.backend).grammar(request.grammar)
        except Exception as exc:
            self._end(slot, FinishReason.ERROR, f"bad sampling parameters: {exc}")

    def _use_tiers(self, slot: _Slot, tokens: Sequence[int], reuse: int) -> int:
        """Restore the longest stored prefix of `tokens` into `slot` if it beats the slot's
        own cache, saving what the slot held first; otherwise save the part of the slot's
        cache about to be cut. Returns the number of prompt tokens now in the slot."""
        kv = self.kv_cache
        assert kv is not None
        backend = cast(StatefulBackend, self.backend)
        hit = kv.lookup(tokens)
        if hit is not None and min(hit.length, len(tokens) - 1) - reuse >= RESTORE_GAIN:
            data = kv.load(hit)
            if data is not None:
                self._save_slot(slot, 0)
                if backend.state_set(slot.seq_id, data):
                    slot.cached = list(hit.entry.tokens)
                    self.metrics.kv_lookup(hit.tier)
                    return min(hit.length, len(tokens) - 1)
                log.warning("llama.cpp refused a stored state of %d tokens", hit.length)
                slot.cached.clear()  # state_set left the sequence empty
                self.metrics.kv_lookup("miss")
                return 0
        self._save_slot(slot, reuse)
        self.metrics.kv_lookup("slot" if reuse >= kvcache.MIN_TOKENS else "miss")
        return reuse

    def _save_slot(self, slot: _Slot, keep: int) -> None:
        """Put the slot's sequence into the tiers if more than a little of it is about to be
        dropped (only its first `keep` tokens stay)."""
        if self.kv_cache is None or len(slot.cached) - keep < kvcache.MIN_TOKENS:
            return
        state = cast(StatefulBackend, self.backend).state_get(slot.seq_id)
        self.kv_cache.put(slot.cached, state)

    def _pick_slot(self, tokens: Sequence[int]) -> _Slot:
        """The idle slot sharing the longest prefix with `tokens`, among those whose cache
        would mostly be kept (at least half of it shared: a continuation of that discussion)
        or that hold most of the prompt; otherwise the free slot of lowest id, so that one
        request does not take another discussion's cache for the sake of a few shared
        tokens, and the busy slots stay consecutive."""
        best: _Slot | None = None
        best_key: tuple[bool, int, int] | None = None
        for slot in self._slots:
            if slot.gen is None:
                shared = common_prefix_len(slot.cached, tokens)
                # a continuation of its discussion, or most of this prompt (a repeated
                # system prompt or document): reusing it beats decoding it again, and the
                # cut tail goes to the KV tiers
                continues = 2 * shared >= len(slot.cached) or (
                    shared >= MIN_SHARED_PROMPT and 2 * shared >= len(tokens))
                # otherwise the lowest sequence id: the busy slots stay consecutive, and
                # llama.cpp decodes consecutive sequences of per-slot KV streams in one
                # micro-batch (what the slot held goes to the KV tiers)
                key = (continues, shared if continues else 0, -slot.seq_id)
                if best_key is None or key > best_key:
                    best, best_key = slot, key
        assert best is not None
        return best

    def _step(self) -> None:
        for slot in self._slots:
            if slot.gen is not None and slot.gen.cancelled:
                self._end(slot, FinishReason.CANCELLED)
        batch = self._batch
        batch.clear()
        spans: list[tuple[_Slot, Sequence[int], bool]] = []
        room = batch.capacity
        for slot in self._slots:
            if slot.state is SlotState.GENERATING:
                spans.append((slot, (slot.next_token,), True))
                room -= 1
        # the rest of the batch reads prompts, oldest admission first
        reading = sorted((s for s in self._slots if s.state is SlotState.PROMPT),
                         key=lambda s: s.admitted)
        for slot in reading:
            if room <= 0:
                break
            chunk = slot.pending[:room]
            spans.append((slot, chunk, len(chunk) == len(slot.pending)))
            room -= len(chunk)
        if not spans:
            return
        # in sequence order: llama.cpp splits a batch over per-slot KV streams into
        # micro-batches of consecutive sequence ids (each a pass over the weights)
        spans.sort(key=lambda span: span[0].seq_id)
        for slot, tokens, want in spans:
            batch.add(slot.seq_id, tokens, len(slot.cached), want)
        self._totals["steps"] += 1
        self.metrics.step()
        rc = self.backend.decode(batch)
        if rc != 0:
            self._retry_alone(spans, rc)
            return
        index = 0
        for slot, tokens, want in spans:
            index += len(tokens)
            self._advance(slot, tokens, index - 1 if want else -1)

    def _retry_alone(self, spans: list[tuple[_Slot, Sequence[int], bool]], rc: int) -> None:
        """The batch failed: decode each slot's part alone so only the culprit ends."""
        log.warning("llama_decode failed (%d) on a batch of %d slots; retrying them one by one",
                    rc, len(spans))
        for slot, _, _ in spans:  # undo whatever a failing decode left in the cache
            self.backend.seq_rm(slot.seq_id, len(slot.cached), -1)
        batch = self._batch
        for slot, tokens, want in spans:
            batch.clear()
            index = batch.add(slot.seq_id, tokens, len(slot.cached), want)
            rc = self.backend.decode(batch)
            if rc == 0:
                self._advance(slot, tokens, index if want else -1)
            else:
                self.backend.seq_rm(slot.seq_id, len(slot.cached), -1)
                reason = ("the context has no room left" if rc == 1
                          else "the model could not decode this input")
                self._end(slot, FinishReason.ERROR, f"llama_decode failed ({rc}): {reason}")

    def _advance(self, slot: _Slot, tokens: Sequence[int], index: int) -> None:
        """`tokens` are now in the slot's KV; sample if their logits came out."""
        slot.cached.extend(tokens)
        if slot.state is SlotState.PROMPT:
            slot.pending = slot.pending[len(tokens):]
            self._totals["prompt_decoded"] += len(tokens)
        if index < 0:
            return
        row = self.backend.logits(index)
        if slot.followers:  # the prompt is read: the other choices start from here
            self._fork(slot, row)
        self._sample(slot, row)

    def _fork(self, leader: _Slot, row: npt.NDArray[np.float32]) -> None:
        """The leader's prompt is in its KV: each FOLLOWING slot gets a copy of that
        sequence (cells shared, nothing decoded again) and samples from a copy of the
        leader's logits row (sampling edits the row in place)."""
        followers, leader.followers = leader.followers, []
        backend = cast(SequenceCopyBackend, self.backend)
        for slot, gen in followers:
            if slot.gen is not gen or slot.state is not SlotState.FOLLOWING:
                continue  # cancelled meanwhile
            backend.seq_cp(leader.seq_id, slot.seq_id, -1, -1)
            slot.cached = list(leader.cached)
            self._totals["prompt_reused"] += len(slot.cached)
            self._sample(slot, row.copy())

    def _sample(self, slot: _Slot, row: npt.NDArray[np.float32]) -> None:
        """Sample the slot's next token from its logits row, then stream or end."""
        assert slot.sampler is not None and slot.gen is not None and slot.detector is not None
        grammar = slot.grammar
        if grammar is None:
            token = slot.sampler.sample(row)
        else:
            try:
                token, row = self._sample_constrained(slot, grammar, row)
            except Exception as exc:  # a dead end of the grammar: this request fails alone
                self._end(slot, FinishReason.ERROR, f"grammar sampling failed: {exc}")
                return
        slot.sampler.accept(token)
        if slot.gen.request.params.n_probs >= 0:
            self._logprob(slot, row, token)
        slot.n_generated += 1
        self._totals["generated"] += 1
        now = time.monotonic()
        metrics = self.metrics
        metrics.generated()
        if slot.n_generated == 1:
            metrics.time_to_first_token.observe(now - slot.gen.submitted_at)
        else:
            metrics.inter_token.observe(now - slot.last_token_at)
        slot.last_token_at = now
        if self.backend.is_eog(token):
            self._end(slot, FinishReason.STOP)
            return
        text = slot.detector.feed(self.backend.piece(token))
        if text:
            slot.parts.append(text)
            self._emit(slot.gen, text)
        if slot.detector.stopped:
            self._end(slot, FinishReason.STOP)
        elif slot.n_generated >= slot.gen.request.params.n_predict:
            self._end(slot, FinishReason.LENGTH)
        elif len(slot.cached) >= self.n_ctx_slot:  # no position left for this token
            self._end(slot, FinishReason.LENGTH)
        else:
            slot.next_token = token
            slot.state = SlotState.GENERATING

    def _sample_constrained(self, slot: _Slot, grammar: GrammarMatcher,
                            row: npt.NDArray[np.float32]
                            ) -> tuple[int, npt.NDArray[np.float32]]:
        """The fast path: sample freely and ask the grammar about that one token. Only when
        it is refused does the grammar filter the row (a copy taken before sampling edited
        it): the best allowed candidates the sampler can draw from (greedy: the best one;
        top-k: the k best; without top-k: the allowed ones among the most likely 16,384),
        then the sampler draws again. Returns the token and the row it came from."""
        assert slot.sampler is not None and slot.gen is not None
        scratch = self._scratch_row(row)
        token = slot.sampler.sample(row)
        if not grammar.allows(token):
            params = slot.gen.request.params
            if params.temperature <= 0:
                grammar.mask_top(scratch, 1)
            elif params.top_k > 0:
                grammar.mask_top(scratch, params.top_k, exact=False)
            else:
                grammar.mask_top(scratch, GRAMMAR_CANDIDATES, exact=False)
            row = scratch
            token = slot.sampler.sample(row)
            self._totals["grammar_masks"] += 1
            self.metrics.grammar_masked()
        grammar.accept(token)
        return token, row

    def _scratch_row(self, row: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """A copy of `row` in a buffer reused across steps (engine thread only)."""
        if self._scratch is None or self._scratch.shape != row.shape:
            self._scratch = np.empty_like(row)
        np.copyto(self._scratch, row)
        return self._scratch

    def _logprob(self, slot: _Slot, row: npt.NDArray[np.float32], token: int) -> None:
        assert slot.gen is not None
        n = slot.gen.request.params.n_probs
        value, top = sampling.top_logprobs(row, token, n)
        piece = self.backend.piece
        entry = TokenLogprob(token, piece(token), value,
                             tuple((piece(t), lp) for t, lp in top))
        update = self._updates.get(slot.gen)
        if update is None:
            update = self._updates[slot.gen] = _Update("", None)
        if update.logprobs is None:
            update.logprobs = []
        update.logprobs.append(entry)

    def _end(self, slot: _Slot, reason: FinishReason, error: str | None = None) -> None:
        gen = slot.gen
        assert gen is not None
        followers, slot.followers = slot.followers, []
        for other, follower in followers:  # choices still waiting for this prompt end
            if other.gen is follower and other.state is SlotState.FOLLOWING:
                self._end(other, reason, error)
        tail = slot.detector.finish() if slot.detector is not None else ""
        if tail:
            slot.parts.append(tail)
            self._emit(gen, tail)
        finish = Finish(reason, error, slot.n_prompt, slot.n_reused, slot.n_generated,
                        "".join(slot.parts))
        self._emit(gen, "", finish)
        # the slot's KV stays: the next request sharing its prefix skips those tokens
        if slot.grammar is not None:
            slot.grammar.close()
        slot.gen, slot.sampler, slot.detector, slot.grammar = None, None, None, None
        slot.state = SlotState.IDLE
        slot.pending, slot.parts = (), []
        self._release(gen, reason)

    def _finish_unslotted(self, gen: Generation, reason: FinishReason, error: str | None) -> None:
        self._emit(gen, "", Finish(reason, error, len(gen.request.tokens), 0, 0, ""))
        self._release(gen, reason)

    def _release(self, gen: Generation, reason: FinishReason) -> None:
        self.metrics.ended(reason, time.monotonic() - gen.submitted_at)
        if reason is FinishReason.ERROR:
            self._totals["errors"] += 1
        with self._cond:
            self._outstanding -= 1

    def _reset_kv(self, slot: _Slot) -> None:
        self.backend.seq_rm(slot.seq_id, -1, -1)
        slot.cached.clear()

    def _emit(self, gen: Generation, text: str, finish: Finish | None = None) -> None:
        update = self._updates.get(gen)
        if update is None:
            self._updates[gen] = _Update(text, finish)
        else:
            update.text += text
            if finish is not None:
                update.finish = finish

    def _deliver(self) -> None:
        """Hand this step's results to asyncio: one call per event loop."""
        if not self._updates:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, _Update]]] = {}
        for gen, update in self._updates.items():
            by_loop.setdefault(gen._loop, []).append((gen, update))
        self._updates = {}
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _shutdown(self) -> None:
        """Cancel every request, running or waiting (on the engine thread, or in `close`),
        and hand the slots' sequences to the KV tiers (a restart continues them)."""
        for slot in self._slots:
            if slot.gen is not None:
                self._end(slot, FinishReason.CANCELLED)
        if self.kv_cache is not None:
            for slot in self._slots:
                try:
                    self._save_slot(slot, 0)
                except Exception:  # saving is a convenience: never block the shutdown
                    log.exception("could not save slot %d to the KV cache", slot.seq_id)
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for gen in waiting:
            for g in (gen, *gen.followers):
                self._finish_unslotted(g, FinishReason.CANCELLED, None)
        self._deliver()


def _push_all(items: list[tuple[Generation, _Update]]) -> None:
    for gen, update in items:
        gen._push(update.text, update.finish, update.logprobs)
