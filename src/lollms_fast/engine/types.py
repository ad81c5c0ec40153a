"""Small types the engine shares with its callers and its metrics."""

from __future__ import annotations

from enum import Enum


class FinishReason(str, Enum):
    """Why a generation ended (its value is what clients receive as `finish_reason`)."""

    STOP = "stop"  # end-of-generation token or anti-prompt
    LENGTH = "length"  # n_predict reached, or the slot's context is full
    CANCELLED = "cancelled"  # stop_gen, a client that went away, shutdown
    ERROR = "error"  # the request failed; `Finish.error` says why

    def __str__(self) -> str:
        return self.value
