"""Pure-Python twin of the native sampling module (same results, used as the test oracle)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def greedy(logits: npt.NDArray[np.float32]) -> int:
    """Index of the largest logit (the first one on ties); -1 for an empty row."""
    if len(logits) == 0:
        return -1
    return int(np.argmax(logits))
