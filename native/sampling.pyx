# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Token sampling on a float32 logits row (native twin of lollms_fast._native.sampling_py)."""


cpdef int greedy(const float[::1] logits) noexcept nogil:
    """Index of the largest logit (the first one on ties); -1 for an empty row."""
    cdef Py_ssize_t n = logits.shape[0]
    cdef Py_ssize_t i, best = 0
    cdef float best_value
    if n == 0:
        return -1
    best_value = logits[0]
    for i in range(1, n):
        if logits[i] > best_value:
            best_value = logits[i]
            best = i
    return <int>best
