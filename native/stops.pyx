# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Stop detection over streamed UTF-8 bytes (native twin of lollms_fast._native.stops_py).

The behaviour is documented in stops_py.py; tests/test_stops.py checks both twins agree.
"""

from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove


cpdef Py_ssize_t complete_utf8_len(const unsigned char[::1] data) noexcept nogil:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        return 0
    return _complete_len(&data[0], n)


cdef inline Py_ssize_t _complete_len(const unsigned char* data, Py_ssize_t n) noexcept nogil:
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


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    if 0x41 <= c <= 0x5A:
        return c + 0x20
    return c


cdef class StopDetector:
    """Incremental anti-prompt detector over streamed UTF-8 bytes."""

    cdef unsigned char* _raw      # bytes not yet emitted
    cdef unsigned char* _folded   # the same, ASCII-lowercased (unless case_sensitive)
    cdef bint _fold
    cdef Py_ssize_t _len
    cdef Py_ssize_t _cap
    cdef unsigned char* _stops    # all anti-prompts (folded), back to back
    cdef Py_ssize_t* _stop_off
    cdef Py_ssize_t* _stop_len
    cdef Py_ssize_t _n_stops
    cdef Py_ssize_t _longest
    cdef Py_ssize_t _emitted
    cdef readonly bint stopped
    cdef readonly Py_ssize_t cut

    def __cinit__(self, anti_prompts=(), bint case_sensitive=False):
        self._fold = not case_sensitive
        encoded = [s.encode("utf-8") for s in anti_prompts if s]
        if self._fold:
            encoded = [b.lower() for b in encoded]
        cdef Py_ssize_t total = sum(len(b) for b in encoded)
        cdef Py_ssize_t i, off = 0
        cdef bytes b
        self._n_stops = len(encoded)
        self._stops = <unsigned char*>malloc(total + 1)
        self._stop_off = <Py_ssize_t*>malloc((self._n_stops + 1) * sizeof(Py_ssize_t))
        self._stop_len = <Py_ssize_t*>malloc((self._n_stops + 1) * sizeof(Py_ssize_t))
        if self._stops == NULL or self._stop_off == NULL or self._stop_len == NULL:
            raise MemoryError()
        for i in range(self._n_stops):
            b = encoded[i]
            memcpy(self._stops + off, <const char*>b, len(b))
            self._stop_off[i] = off
            self._stop_len[i] = len(b)
            if len(b) > self._longest:
                self._longest = len(b)
            off += len(b)
        self._cap = 64
        self._raw = <unsigned char*>malloc(self._cap)
        self._folded = <unsigned char*>malloc(self._cap)
        if self._raw == NULL or self._folded == NULL:
            raise MemoryError()
        self.cut = -1

    def __dealloc__(self):
        free(self._raw)
        free(self._folded)
        free(self._stops)
        free(self._stop_off)
        free(self._stop_len)

    def feed(self, bytes data):
        """Add one token's bytes; return the text that can be shown now."""
        cdef Py_ssize_t n = len(data)
        cdef Py_ssize_t match, complete, hold
        if self.stopped:
            return ""
        if not self._append(<const unsigned char*><const char*>data, n):
            raise MemoryError()
        match = self._find()
        if match >= 0:
            self.stopped = True
            self.cut = self._emitted + match
            return self._take(match)
        complete = _complete_len(self._raw, self._len)
        hold = self._hold_start(complete)
        return self._take(complete if complete < hold else hold)

    def finish(self):
        """The end of the stream: whatever is still held back (nothing after a stop)."""
        if self.stopped:
            return ""
        return self._take(self._len)

    cdef bint _append(self, const unsigned char* data, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i, cap = self._cap
        cdef unsigned char* raw
        cdef unsigned char* folded
        if self._len + n > cap:
            while self._len + n > cap:
                cap *= 2
            raw = <unsigned char*>realloc(self._raw, cap)
            if raw == NULL:
                return False
            self._raw = raw
            folded = <unsigned char*>realloc(self._folded, cap)
            if folded == NULL:
                return False
            self._folded = folded
            self._cap = cap
        memcpy(self._raw + self._len, data, n)
        for i in range(n):
            self._folded[self._len + i] = _lower(data[i]) if self._fold else data[i]
        self._len += n
        return True

    cdef Py_ssize_t _find(self) noexcept nogil:
        """Earliest start of any anti-prompt in the pending bytes, or -1."""
        cdef Py_ssize_t best = -1, s, at, sl, last
        cdef const unsigned char* stop
        for s in range(self._n_stops):
            stop = self._stops + self._stop_off[s]
            sl = self._stop_len[s]
            last = self._len - sl
            if best >= 0 and best < last:
                last = best - 1
            at = 0
            while at <= last:
                if self._folded[at] == stop[0] and memcmp(self._folded + at, stop, sl) == 0:
                    best = at
                    break
                at += 1
        return best

    cdef Py_ssize_t _hold_start(self, Py_ssize_t end) noexcept nogil:
        """Earliest i such that folded[i:end] is the beginning of some anti-prompt."""
        cdef Py_ssize_t i, s, tail
        i = end - self._longest + 1
        if i < 0:
            i = 0
        while i < end:
            tail = end - i
            for s in range(self._n_stops):
                if (tail < self._stop_len[s]
                        and memcmp(self._folded + i, self._stops + self._stop_off[s], tail) == 0):
                    return i
            i += 1
        return end

    cdef str _take(self, Py_ssize_t n):
        cdef str out = (<char*>self._raw)[:n].decode("utf-8", "replace")
        if self.stopped:
            self._len = 0
        else:
            memmove(self._raw, self._raw + n, self._len - n)
            memmove(self._folded, self._folded + n, self._len - n)
            self._len -= n
        self._emitted += n
        return out
