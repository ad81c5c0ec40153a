"""What the engine counts for /metrics: recorded on the engine thread, read on scrape.

Recording is a few integer additions per step (no locks on the hot path beyond one small
uncontended one per histogram observation, no allocation); the server's Prometheus collector
reads a consistent snapshot when it is scraped, so serving metrics adds no work per token to
the event loop. One EngineMetrics outlives engine reloads, so the counters never go back.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from .types import FinishReason

# seconds; time to first token spans prompt decoding (long prompts take seconds)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# seconds between two tokens of one answer: one decode step, shared by every slot
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    buckets: tuple[float, ...]  # upper bounds, +Inf implied
    counts: tuple[int, ...]  # per bucket (not cumulative), the last one is +Inf
    total: float
    count: int


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)  # le semantics: value <= bound
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts = tuple(self._counts)
            total = self._sum
        return HistogramSnapshot(self.buckets, counts, total, sum(counts))


class EngineMetrics:
    """Counters and histograms of every engine of one server (shared across reloads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.finished = dict.fromkeys(FinishReason, 0)
        self.prompt_tokens = 0  # prompt tokens of admitted requests (decoded + reused)
        self.prompt_tokens_reused = 0  # taken from a slot's cached prefix, not decoded
        self.generated_tokens = 0
        self.decode_steps = 0  # llama_decode calls (a step serves every active slot)
        self.grammar_masks = 0  # sampled tokens a grammar refused (the whole row was masked)
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token = Histogram(INTER_TOKEN_BUCKETS)
        self.request_duration = Histogram(DURATION_BUCKETS)
        # admissions by where their prompt's prefix came from: a slot's own cache, the RAM
        # or disk tier, or nowhere (miss)
        self.kv_lookups = dict.fromkeys(("slot", "ram", "disk", "miss"), 0)

    def admitted(self, n_prompt: int, n_reused: int) -> None:
        with self._lock:
            self.prompt_tokens += n_prompt
            self.prompt_tokens_reused += n_reused

    def generated(self, n: int = 1) -> None:
        with self._lock:
            self.generated_tokens += n

    def step(self) -> None:
        with self._lock:
            self.decode_steps += 1

    def grammar_masked(self) -> None:
        with self._lock:
            self.grammar_masks += 1

    def ended(self, reason: FinishReason, duration: float) -> None:
        with self._lock:
            self.finished[reason] += 1
        self.request_duration.observe(duration)

    def kv_lookup(self, tier: str) -> None:
        with self._lock:
            self.kv_lookups[tier] += 1

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"prompt_tokens": self.prompt_tokens,
                    "prompt_tokens_reused": self.prompt_tokens_reused,
                    "generated_tokens": self.generated_tokens,
                    "decode_steps": self.decode_steps,
                    "grammar_masks": self.grammar_masks,
                    **{f"kv_{tier}": n for tier, n in self.kv_lookups.items()},
                    **{f"finished_{r.value}": n for r, n in self.finished.items()}}
