from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

def greedy(logits: npt.NDArray[np.float32]) -> int: ...
def top_logprobs(logits: npt.NDArray[np.float32], token: int,
                 n: int) -> tuple[float, list[tuple[int, float]]]: ...

class Sampler:
    temperature: float
    top_k: int
    top_p: float
    repeat_penalty: float
    repeat_last_n: int
    presence_penalty: float
    frequency_penalty: float
    def __init__(self, temperature: float = ..., top_k: int = ..., top_p: float = ...,
                 repeat_penalty: float = ..., repeat_last_n: int = ...,
                 seed: int = ..., *, presence_penalty: float = ...,
                 frequency_penalty: float = ...,
                 logit_bias: Mapping[int, float] | Iterable[tuple[int, float]] | None = ...
                 ) -> None: ...
    def accept(self, token: int) -> None: ...
    def accept_many(self, tokens: Iterable[int]) -> None: ...
    def sample(self, logits: npt.NDArray[np.float32]) -> int: ...
