"""Pure-Python twin of the native sampling module (same results, used as the test oracle).

The algorithm, shared bit for bit with native/sampling.pyx:

1. logit bias: each (id, bias) added to the row (float32, in place); ids outside the row are
   skipped. Built with dict() from a mapping or (id, bias) pairs, so the last pair for an id
   wins; biases must be finite or -inf (a ban);
2. penalties (llama.cpp's "penalties" sampler), skipped when repeat_penalty is 1 and the
   presence and frequency penalties are 0: for each *distinct* token t among the last
   `repeat_last_n` accepted tokens, occurring c times there, in float32 and in this order:
   l = l * repeat_penalty if l <= 0 else l / repeat_penalty, then
   l = l - (float32(c) * frequency_penalty + presence_penalty)   (written back in place);
3. temperature <= 0: greedy, the first index of the largest logit;
4. candidates: the `top_k` best logits (all of them when top_k <= 0), ordered by logit
   descending then token id ascending (a total order, so both twins agree on ties);
5. top-p at temperature 1: keep the shortest head whose cumulative probability (exp in double,
   summed in candidate order; normalized over the candidates, or over the whole row when
   top_k <= 0) reaches `top_p`;
6. temperature: weights exp((l - l_max) / T) in double over the kept head, summed in order;
   a uniform draw u in [0, 1) from the per-sampler splitmix64 stream picks the first
   candidate whose cumulative weight exceeds u * total.

Logits must be finite (or -inf); NaN ordering is not specified.

`top_logprobs(row, token, n)` is the log-softmax at temperature 1 of the row as given (the
engine calls it on the row `sample` penalised): l - l_max - log(sum of exp(l - l_max)), the
sum in double; a -inf logit has logprob -inf, and the row needs a finite largest logit. The
twins sum in different orders (numpy pairwise here, sequentially in C), so their logprobs
agree to about 1e-5, not bit for bit: compare them with a tolerance. The ids of the n best
(logit descending, id ascending) are exact.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, deque
from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

_MASK64 = (1 << 64) - 1
_TWO_POW_53_INV = 1.0 / 9007199254740992.0


def greedy(logits: npt.NDArray[np.float32]) -> int:
    """Index of the largest logit (the first one on ties); -1 for an empty row."""
    if len(logits) == 0:
        return -1
    return int(np.argmax(logits))


def top_logprobs(logits: npt.NDArray[np.float32], token: int,
                 n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-softmax (temperature 1) of the row as given: (logprob of `token`, the `n` best
    (token id, logprob) pairs by logit descending then id ascending). The row is not
    modified."""
    size = len(logits)
    token, n = operator.index(token), operator.index(n)
    if not 0 <= token < size:
        raise IndexError(f"token {token} is outside the row of {size} logits")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    top = float(logits[greedy(logits)])
    log_total = math.log(float(np.sum(np.exp(logits.astype(np.float64) - top))))
    best = np.argsort(-logits, kind="stable")[: min(n, size)]
    return ((float(logits[token]) - top) - log_total,
            [(int(i), (float(logits[i]) - top) - log_total) for i in best])


class SplitMix64:
    """The 64-bit generator both twins use (Steele, Lea & Flood's splitmix64)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next_u64() >> 11) * _TWO_POW_53_INV


class Sampler:
    """One slot's sampler: parameters, the recent-token window and the RNG stream."""

    def __init__(self, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
                 repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int = 0, *,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 logit_bias: Mapping[int, float] | Iterable[tuple[int, float]] | None = None
                 ) -> None:
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.repeat_penalty = np.float32(repeat_penalty)
        self.presence_penalty = np.float32(presence_penalty)
        self.frequency_penalty = np.float32(frequency_penalty)
        # ids no row can have (token ids are int32) are dropped here, the others beyond the
        # row's length when sampling
        bias = {t: b for t, b in ((operator.index(k), float(v))
                                  for k, v in dict(logit_bias or {}).items())
                if 0 <= t <= 0x7FFFFFFF}
        self._bias_ids = np.array(list(bias), dtype=np.int64)
        self._bias_values = np.array(list(bias.values()), dtype=np.float32)
        self.repeat_last_n = max(0, int(repeat_last_n))
        self._recent: deque[int] = deque(maxlen=self.repeat_last_n or 1)
        self._rng = SplitMix64(seed)

    def accept(self, token: int) -> None:
        """Record a token (prompt or generated) in the repeat-penalty window."""
        if self.repeat_last_n > 0:
            self._recent.append(int(token))

    def accept_many(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.accept(t)

    def sample(self, logits: npt.NDArray[np.float32]) -> int:
        """Pick the next token from a float32 row (modified in place by the logit bias and
        the penalties)."""
        n = len(logits)
        if n == 0:
            return -1
        if len(self._bias_ids):
            inside = self._bias_ids < n
            logits[self._bias_ids[inside]] += self._bias_values[inside]
        self._apply_penalty(logits)
        if self.temperature <= 0.0:
            return greedy(logits)
        u = self._rng.uniform()
        if self.top_k <= 0 and self.top_p >= 1.0:
            return _sample_unsorted(logits, self.temperature, u)
        order = np.argsort(-logits, kind="stable")  # descending, ties by ascending id
        if self.top_k > 0:
            order = order[: min(self.top_k, n)]
        values = [float(logits[i]) for i in order]
        m = len(values)
        if self.top_p < 1.0:
            top = values[0]
            if self.top_k > 0:
                total = 0.0
                for v in values:
                    total += math.exp(v - top)
            else:
                total = 0.0
                for x in logits:
                    total += math.exp(float(x) - top)
            cum = 0.0
            for j, v in enumerate(values):
                cum += math.exp(v - top)
                if cum / total >= self.top_p:
                    m = j + 1
                    break
        return int(order[_pick(values, m, self.temperature, u)])

    def _apply_penalty(self, logits: npt.NDArray[np.float32]) -> None:
        pen, freq, pres = self.repeat_penalty, self.frequency_penalty, self.presence_penalty
        if self.repeat_last_n <= 0 or (pen == np.float32(1.0) and freq == np.float32(0.0)
                                       and pres == np.float32(0.0)):
            return
        n = len(logits)
        for t, c in sorted(Counter(self._recent).items()):
            if 0 <= t < n:
                v = logits[t]
                v = v * pen if v <= 0 else v / pen
                logits[t] = v - (np.float32(c) * freq + pres)


def _draw(weights: list[float], u: float) -> int:
    """The index where the running sum of `weights` first passes u * their total (summed
    in order, as the native code does, so both pick the same index)."""
    total = 0.0
    for w in weights:
        total += w
    r = u * total
    cum = 0.0
    for j, w in enumerate(weights):
        cum += w
        if cum > r:
            return j
    return len(weights) - 1


def _pick(values: list[float], m: int, temperature: float, u: float) -> int:
    top = values[0]
    return _draw([math.exp((values[j] - top) / temperature) for j in range(m)], u)


def _sample_unsorted(logits: npt.NDArray[np.float32], temperature: float, u: float) -> int:
    top = float(logits[greedy(logits)])
    return _draw([math.exp((float(x) - top) / temperature) for x in logits], u)
