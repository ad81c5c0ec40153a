"""Small types the engine shares with its callers and its metrics."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FinishReason(str, Enum):
    """Why a generation ended (its value is what clients receive as `finish_reason`)."""

    STOP = "stop"  # end-of-generation token or anti-prompt
    LENGTH = "length"  # n_predict reached, or the slot's context is full
    CANCELLED = "cancelled"  # stop_gen, a client that went away, shutdown
    ERROR = "error"  # the request failed; `Finish.error` says why

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token with its log-probability and the most likely alternatives
    (log-softmax at temperature 1 of the row it was sampled from, after bias and penalties)."""

    token: int
    piece: bytes  # the token's bytes (part of a character for some tokens)
    logprob: float
    top: tuple[tuple[bytes, float], ...]  # (piece, logprob), most likely first
