"""Pure-Python twin of the native stop-detection module (the test oracle)."""

from __future__ import annotations


def complete_utf8_len(data: bytes | bytearray | memoryview) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence."""
    n = len(data)
    i = n - 1
    back = 0
    while i >= 0 and back < 4:
        c = data[i]
        if c < 0x80:
            return n
        if c >= 0xC0:
            need = 4 if c >= 0xF0 else 3 if c >= 0xE0 else 2
            return n if n - i >= need else i
        i -= 1
        back += 1
    return n
