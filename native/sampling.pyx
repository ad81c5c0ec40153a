# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Token sampling on a float32 logits row (native twin of lollms_fast._native.sampling_py).

The algorithm and its exact floating-point order are documented in sampling_py.py; both
twins must return the same token for the same inputs (tests/test_sampling.py checks it).
The work runs without the GIL on the row in place: the only writes are the logit bias's and
the penalties'.

Bit equality with the twin assumes the C compiler does not contract a multiply and an add
into one fused instruction (the default x86-64 target has no FMA); a build for an FMA target
with contraction on may differ from the twin in the last bit of a penalised logit.
"""

from operator import index

from libc.math cimport exp, log
from libc.stdint cimport INT32_MAX, int32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc


cdef struct Cand:
    float logit
    int32_t id


# Scans of the whole row go by blocks: a block's maximum is a reduction the C compiler
# vectorizes, and only a block that beats the best so far is looked at element by element
# (rare after the first few blocks). A plain compare-and-track-index loop does not vectorize
# and was 4x slower on the 262,144-entry row.
cdef enum:
    BLOCK = 256
    LANES = 16


cdef inline float _block_max(const float* x, Py_ssize_t n) noexcept nogil:
    """Maximum of x[0:n], n a multiple of LANES."""
    cdef float acc[LANES]
    cdef Py_ssize_t i, j
    cdef float m
    for j in range(LANES):
        acc[j] = x[j]
    i = LANES
    while i < n:
        for j in range(LANES):
            acc[j] = x[i + j] if x[i + j] > acc[j] else acc[j]
        i += LANES
    m = acc[0]
    for j in range(1, LANES):
        if acc[j] > m:
            m = acc[j]
    return m


cdef inline bint _better(float la, int32_t ia, float lb, int32_t ib) noexcept nogil:
    return la > lb or (la == lb and ia < ib)


cdef int _cmp_cand(const void* a, const void* b) noexcept nogil:
    cdef const Cand* x = <const Cand*>a
    cdef const Cand* y = <const Cand*>b
    if x.logit > y.logit:
        return -1
    if x.logit < y.logit:
        return 1
    return (x.id > y.id) - (x.id < y.id)


cdef int _cmp_int(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<const int32_t*>a)[0]
    cdef int32_t y = (<const int32_t*>b)[0]
    return (x > y) - (x < y)


cdef inline void _sift_down(Cand* h, Py_ssize_t k, Py_ssize_t i) noexcept nogil:
    # a heap whose root is the *worst* kept candidate
    cdef Cand item = h[i]
    cdef Py_ssize_t child
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        if child + 1 < k and _better(h[child].logit, h[child].id,
                                     h[child + 1].logit, h[child + 1].id):
            child += 1
        if _better(item.logit, item.id, h[child].logit, h[child].id):
            h[i] = h[child]
            i = child
        else:
            break
    h[i] = item


cdef void _select_top(const float* x, Py_ssize_t n, Py_ssize_t k, Cand* out) noexcept nogil:
    """The k best (logit desc, id asc) of x[0:n] into out[0:k], sorted. One pass, no full sort."""
    cdef Py_ssize_t i
    for i in range(k):
        out[i].logit = x[i]
        out[i].id = <int32_t>i
    i = k // 2 - 1
    while i >= 0:
        _sift_down(out, k, i)
        i -= 1
    cdef float worst = out[0].logit
    cdef Py_ssize_t start, stop
    # later ids never win a tie, so a strict comparison is the whole test; whole blocks
    # below the worst kept candidate are skipped after one vectorized pass
    i = k
    while i < n:
        start = i
        stop = i + BLOCK if i + BLOCK <= n else n
        if stop - start == BLOCK and _block_max(x + start, BLOCK) <= worst:
            i = stop
            continue
        for i in range(start, stop):
            if x[i] > worst:
                out[0].logit = x[i]
                out[0].id = <int32_t>i
                _sift_down(out, k, 0)
                worst = out[0].logit
        i = stop
    qsort(out, k, sizeof(Cand), _cmp_cand)


cdef inline Py_ssize_t _argmax(const float* x, Py_ssize_t n) noexcept nogil:
    """First index of the largest value."""
    cdef Py_ssize_t i = 0, j, best = 0
    cdef float best_value = x[0], m
    while i + BLOCK <= n:
        m = _block_max(x + i, BLOCK)
        if m > best_value:
            for j in range(BLOCK):
                if x[i + j] == m:
                    best, best_value = i + j, m
                    break
        i += BLOCK
    while i < n:
        if x[i] > best_value:
            best_value = x[i]
            best = i
        i += 1
    return best


cpdef int greedy(const float[::1] logits) noexcept nogil:
    """Index of the largest logit (the first one on ties); -1 for an empty row."""
    cdef Py_ssize_t n = logits.shape[0]
    if n == 0:
        return -1
    return <int>_argmax(&logits[0], n)


def top_logprobs(const float[::1] logits, token, n):
    """Log-softmax (temperature 1) of the row as given: (logprob of `token`, the `n` best
    (token id, logprob) pairs by logit descending then id ascending). The row is not
    modified."""
    cdef Py_ssize_t size = logits.shape[0], t, k, i
    cdef const float* x
    cdef Cand* cand = NULL
    cdef double top, total = 0.0, log_total
    token, n = index(token), index(n)
    if not 0 <= token < size:
        raise IndexError(f"token {token} is outside the row of {size} logits")
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    t = token
    k = n if n < size else size
    if k > 0:
        cand = <Cand*>malloc(k * sizeof(Cand))
        if cand == NULL:
            raise MemoryError()
    x = &logits[0]
    with nogil:
        top = x[_argmax(x, size)]
        for i in range(size):
            total += exp(<double>x[i] - top)
        if k > 0:
            _select_top(x, size, k, cand)
    log_total = log(total)
    best = []
    try:
        for i in range(k):
            best.append((<int>cand[i].id, (<double>cand[i].logit - top) - log_total))
    finally:
        free(cand)
    return (<double>x[t] - top) - log_total, best


cdef class Sampler:
    """One slot's sampler: parameters, the recent-token window and the RNG stream."""

    cdef readonly double temperature
    cdef readonly int top_k
    cdef readonly double top_p
    cdef readonly float repeat_penalty
    cdef readonly int repeat_last_n
    cdef readonly float presence_penalty
    cdef readonly float frequency_penalty
    cdef int32_t* _bias_ids
    cdef float* _bias_values
    cdef Py_ssize_t _n_bias
    cdef int32_t* _ring
    cdef int32_t* _scratch
    cdef Py_ssize_t _ring_len
    cdef Py_ssize_t _ring_pos
    cdef Cand* _cand
    cdef Py_ssize_t _cand_cap
    cdef uint64_t _state

    def __cinit__(self, double temperature=0.0, int top_k=40, double top_p=0.95,
                  float repeat_penalty=1.0, int repeat_last_n=64, seed=0, *,
                  float presence_penalty=0.0, float frequency_penalty=0.0, logit_bias=None):
        cdef Py_ssize_t j = 0
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.repeat_penalty = repeat_penalty
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        # dict(): a mapping or (id, bias) pairs, the last pair for an id wins; ids no row
        # can have are dropped here, ids beyond the row's length are skipped when sampling
        bias = []
        for key, value in dict(logit_bias or {}).items():
            t = index(key)
            if 0 <= t <= INT32_MAX:
                bias.append((t, float(value)))
        if bias:
            self._bias_ids = <int32_t*>malloc(len(bias) * sizeof(int32_t))
            self._bias_values = <float*>malloc(len(bias) * sizeof(float))
            if self._bias_ids == NULL or self._bias_values == NULL:
                raise MemoryError()
            for t, b in bias:
                self._bias_ids[j] = <int32_t>t
                self._bias_values[j] = <float>b
                j += 1
            self._n_bias = j
        self.repeat_last_n = repeat_last_n if repeat_last_n > 0 else 0
        self._state = <uint64_t>(int(seed) & 0xFFFFFFFFFFFFFFFF)
        if self.repeat_last_n > 0:
            self._ring = <int32_t*>malloc(self.repeat_last_n * sizeof(int32_t))
            self._scratch = <int32_t*>malloc(self.repeat_last_n * sizeof(int32_t))
            if self._ring == NULL or self._scratch == NULL:
                raise MemoryError()

    def __dealloc__(self):
        free(self._ring)
        free(self._scratch)
        free(self._cand)
        free(self._bias_ids)
        free(self._bias_values)

    cpdef void accept(self, int token):
        """Record a token (prompt or generated) in the repeat-penalty window."""
        if self.repeat_last_n > 0:
            self._ring[self._ring_pos] = token
            self._ring_pos = (self._ring_pos + 1) % self.repeat_last_n
            if self._ring_len < self.repeat_last_n:
                self._ring_len += 1

    def accept_many(self, tokens):
        cdef int t
        for t in tokens:
            self.accept(t)

    def sample(self, float[::1] logits):
        """Pick the next token from a float32 row (modified in place by the logit bias and
        the penalties)."""
        cdef Py_ssize_t n = logits.shape[0]
        cdef int result
        if n == 0:
            return -1
        with nogil:
            result = self._sample(&logits[0], n)
        if result == -2:
            raise MemoryError()
        return result

    cdef inline double _uniform(self) noexcept nogil:
        cdef uint64_t z
        self._state += <uint64_t>0x9E3779B97F4A7C15
        z = self._state
        z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
        z = z ^ (z >> 31)
        return <double>(z >> 11) * (1.0 / 9007199254740992.0)

    cdef bint _reserve(self, Py_ssize_t k) noexcept nogil:
        cdef Cand* grown
        if k <= self._cand_cap:
            return True
        grown = <Cand*>realloc(self._cand, k * sizeof(Cand))
        if grown == NULL:
            return False
        self._cand = grown
        self._cand_cap = k
        return True

    cdef void _apply_bias(self, float* x, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i
        cdef int32_t t
        for i in range(self._n_bias):
            t = self._bias_ids[i]
            if t < n:
                x[t] = x[t] + self._bias_values[i]

    cdef void _apply_penalty(self, float* x, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i, j, m = self._ring_len
        cdef int32_t t
        cdef float v, pen = self.repeat_penalty
        cdef float freq = self.frequency_penalty, pres = self.presence_penalty
        if m == 0 or (pen == 1.0 and freq == 0.0 and pres == 0.0):
            return
        for i in range(m):
            self._scratch[i] = self._ring[i]
        qsort(self._scratch, m, sizeof(int32_t), _cmp_int)
        # sorted, so each distinct token is a run of equal ids and its count the run's length
        i = 0
        while i < m:
            t = self._scratch[i]
            j = i + 1
            while j < m and self._scratch[j] == t:
                j += 1
            if 0 <= t < n:
                v = x[t]
                if v <= 0:
                    v = v * pen
                else:
                    v = v / pen
                x[t] = v - (<float>(j - i) * freq + pres)
            i = j

    cdef int _sample(self, float* x, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t k, m, j, i, cut
        cdef double u, top, total
        if self._n_bias > 0:
            self._apply_bias(x, n)
        self._apply_penalty(x, n)
        if self.temperature <= 0.0:
            return <int>_argmax(x, n)
        u = self._uniform()
        if self.top_k <= 0 and self.top_p >= 1.0:
            return self._sample_unsorted(x, n, u)
        if self.top_k > 0:
            k = self.top_k if self.top_k < n else n
            if not self._reserve(k):
                return -2
            _select_top(x, n, k, self._cand)
            m = k
            if self.top_p < 1.0:
                top = self._cand[0].logit
                total = 0.0
                for j in range(k):
                    total += exp(<double>self._cand[j].logit - top)
                cut = self._mass_cut(k, top, total)
                if cut > 0:
                    m = cut
        else:
            # top-p over the whole row: grow the partial selection until it holds the mass
            top = x[_argmax(x, n)]
            total = 0.0
            for i in range(n):
                total += exp(<double>x[i] - top)
            k = 64 if n > 64 else n
            while True:
                if not self._reserve(k):
                    return -2
                _select_top(x, n, k, self._cand)
                m = self._mass_cut(k, top, total)
                if m > 0:
                    break
                if k == n:
                    m = n
                    break
                k = k * 4 if k * 4 < n else n
        return self._cand[self._pick(m, u)].id

    cdef Py_ssize_t _mass_cut(self, Py_ssize_t k, double top, double total) noexcept nogil:
        """How many of the first k candidates hold top_p of the mass `total` (relative to
        the logit `top`), or -1 if all k together do not."""
        cdef double cum = 0.0
        cdef Py_ssize_t j
        for j in range(k):
            cum += exp(<double>self._cand[j].logit - top)
            if cum / total >= self.top_p:
                return j + 1
        return -1

    cdef Py_ssize_t _pick(self, Py_ssize_t m, double u) noexcept nogil:
        cdef double top = self._cand[0].logit
        cdef double temp = self.temperature
        cdef double total = 0.0, cum = 0.0, r
        cdef Py_ssize_t j
        for j in range(m):
            total += exp((<double>self._cand[j].logit - top) / temp)
        r = u * total
        for j in range(m):
            cum += exp((<double>self._cand[j].logit - top) / temp)
            if cum > r:
                return j
        return m - 1

    cdef int _sample_unsorted(self, const float* x, Py_ssize_t n, double u) noexcept nogil:
        cdef double top = x[_argmax(x, n)]
        cdef double temp = self.temperature
        cdef double total = 0.0, cum = 0.0, r
        cdef Py_ssize_t i
        for i in range(n):
            total += exp((<double>x[i] - top) / temp)
        r = u * total
        for i in range(n):
            cum += exp((<double>x[i] - top) / temp)
            if cum > r:
                return <int>i
        return <int>(n - 1)
