# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Stop detection over streamed UTF-8 bytes (native twin of lollms_fast._native.stops_py)."""


cpdef Py_ssize_t complete_utf8_len(const unsigned char[::1] data) noexcept nogil:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t i = n - 1
    cdef Py_ssize_t back = 0
    cdef unsigned char c
    cdef Py_ssize_t need
    while i >= 0 and back < 4:
        c = data[i]
        if c < 0x80:
            return n
        if c >= 0xC0:
            if c >= 0xF0:
                need = 4
            elif c >= 0xE0:
                need = 3
            else:
                need = 2
            if n - i >= need:
                return n
            return i
        i -= 1
        back += 1
    return n
