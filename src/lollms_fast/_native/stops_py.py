"""Pure-Python twin of the native stop-detection module (the test oracle).

`StopDetector` is fed the bytes of each generated token and returns the text that is safe to
show now:

- never an incomplete UTF-8 character (its bytes wait for the next token);
- never text that could be the beginning of an anti-prompt (held back until it either
  completes the anti-prompt or stops matching);
- anti-prompts are matched case-insensitively for ASCII letters (bytes.lower(); other
  characters must match exactly; `case_sensitive=True` matches bytes exactly, as OpenAI
  `stop` sequences are), across token boundaries, only over the bytes not yet
  emitted (at most the longest anti-prompt plus one token);
- once an anti-prompt is found, the text before it is returned, `stopped` becomes true and
  `cut` is the byte offset of the anti-prompt in the whole stream.

Invalid UTF-8 from the model is shown as U+FFFD.
"""

from __future__ import annotations

from collections.abc import Iterable


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


class StopDetector:
    """Incremental anti-prompt detector over streamed UTF-8 bytes."""

    def __init__(self, anti_prompts: Iterable[str] = (), case_sensitive: bool = False) -> None:
        self._fold = not case_sensitive
        self._stops = [s.encode("utf-8") for s in anti_prompts if s]
        if self._fold:
            self._stops = [s.lower() for s in self._stops]
        self._pending = bytearray()
        self._emitted = 0  # bytes of the stream consumed (returned or cut) so far
        self.stopped = False
        self.cut = -1

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that can be shown now."""
        if self.stopped:
            return ""
        pending = self._pending
        pending += data
        folded = bytes(pending).lower() if self._fold else bytes(pending)
        match = -1
        for stop in self._stops:
            at = folded.find(stop)
            if at >= 0 and (match < 0 or at < match):
                match = at
        if match >= 0:
            self.stopped = True
            self.cut = self._emitted + match
            return self._take(match)
        complete = complete_utf8_len(pending)
        return self._take(min(complete, self._hold_start(folded, complete)))

    def finish(self) -> str:
        """The end of the stream: whatever is still held back (nothing after a stop)."""
        if self.stopped:
            return ""
        return self._take(len(self._pending))

    def _hold_start(self, folded: bytes, end: int) -> int:
        """Earliest i such that folded[i:end] is the beginning of some anti-prompt."""
        longest = max((len(s) for s in self._stops), default=0)
        for i in range(max(0, end - longest + 1), end):
            tail = folded[i:end]
            for stop in self._stops:
                if stop.startswith(tail):
                    return i
        return end

    def _take(self, n: int) -> str:
        out = bytes(self._pending[:n])
        if self.stopped:
            self._pending.clear()
        else:
            del self._pending[:n]
        self._emitted += n
        return out.decode("utf-8", "replace")
