from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

def greedy(logits: npt.NDArray[np.float32]) -> int: ...

class Sampler:
    temperature: float
    top_k: int
    top_p: float
    repeat_penalty: float
    repeat_last_n: int
    def __init__(self, temperature: float = ..., top_k: int = ..., top_p: float = ...,
                 repeat_penalty: float = ..., repeat_last_n: int = ...,
                 seed: int = ...) -> None: ...
    def accept(self, token: int) -> None: ...
    def accept_many(self, tokens: Iterable[int]) -> None: ...
    def sample(self, logits: npt.NDArray[np.float32]) -> int: ...
