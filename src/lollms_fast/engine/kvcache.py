"""KV cache tiers: a sequence's state outlives its slot (host RAM) and the process (disk).

When a slot is taken for another prompt, the state of the sequence it held (the bytes of
`llama_state_seq_get_data`) goes to an LRU in RAM and, written through by a background
thread, to a file on disk. On admission the engine asks for the longest cached prefix of the
new prompt; restoring it (`llama_state_seq_set_data`, about a millisecond for a thousand
tokens) replaces decoding it again (about a second).

Entries are keyed by their token prefix, nothing else: the engine knows tokens, never
discussions. Every entry carries the compatibility metadata of the context that produced it
(model sha256, llama.cpp version, KV types, swa_full, context size); a file whose metadata
differs, or whose size or checksum is wrong, is a miss (logged), never a wrong answer.

Disk files are written atomically (temporary file, fsync, rename), so a `kill -9` leaves
whole files or none; the index is rebuilt from the files' headers at start.

File layout: MAGIC, u32 header length, JSON header, n int32 tokens, the state bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger("lollms_fast.kvcache")

MAGIC = b"LFKV\x01\n"
SUFFIX = ".kv"
FORMAT = 1
# a prefix shorter than this is cheaper to decode again than to store
MIN_TOKENS = 64


TokenArray = npt.NDArray[np.int32]


def as_tokens(tokens: Sequence[int] | TokenArray) -> TokenArray:
    return np.ascontiguousarray(tokens, dtype="<i4")


def prefix_key(tokens: Sequence[int] | TokenArray) -> str:
    """The key of a token sequence (int32 little-endian bytes, hashed)."""
    return hashlib.blake2b(as_tokens(tokens).tobytes(), digest_size=16).hexdigest()


def shared_prefix(a: TokenArray, b: TokenArray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class Entry:
    key: str
    tokens: TokenArray  # the stored sequence
    size: int  # bytes of state
    data: bytearray | None = None  # in RAM (None: on disk only)
    path: Path | None = None  # on disk (None: not written yet)
    crc: int = 0
    superseded: bool = False  # a longer stored sequence starts with this one


@dataclass(frozen=True)
class Hit:
    entry: Entry
    tier: str  # "ram" or "disk"
    length: int  # tokens the stored sequence shares with the prompt


@dataclass
class TierStats:
    hits: dict[str, int] = field(default_factory=lambda: {"ram": 0, "disk": 0})
    damaged: int = 0  # disk entries refused at load (size, checksum, metadata)
    saved: int = 0  # states put into the tiers


class KVCache:
    """Thread-safe; the engine thread calls lookup/load/put, one writer thread writes files.

    `ram_budget` and `disk_budget` are bytes; a disk budget of 0 (or no directory) turns the
    disk tier off. `meta` is what a stored state must match to be used.
    """

    def __init__(self, directory: Path | None, *, ram_budget: int, disk_budget: int,
                 meta: Mapping[str, Any]) -> None:
        self.meta = {"format": FORMAT, **meta}
        self.ram_budget = max(0, ram_budget)
        self.disk_budget = max(0, disk_budget) if directory is not None else 0
        self.directory = directory if self.disk_budget else None
        self._lock = threading.Lock()
        self._ram: OrderedDict[str, Entry] = OrderedDict()  # LRU: oldest first
        self._disk: OrderedDict[str, Entry] = OrderedDict()  # LRU by last use
        self._ram_bytes = 0
        self._disk_bytes = 0
        self.stats = TierStats()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-writer")
        self._writes: set[Future[None]] = set()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._scan()

    # ------------------------------------------------------------------ lookups

    def lookup(self, tokens: Sequence[int]) -> Hit | None:
        """The stored sequence sharing the longest prefix with `tokens` (at least
        MIN_TOKENS; RAM first at equal length). The match may stop inside the stored
        sequence: a discussion's next prompt re-tokenizes the last answer, which need not
        give the very tokens that were sampled."""
        probe = as_tokens(tokens)
        with self._lock:
            candidates = [(e, "ram") for e in self._ram.values()]
            candidates += [(e, "disk") for e in self._disk.values() if e.key not in self._ram]
        best: Hit | None = None
        for entry, tier in candidates:
            if len(entry.tokens) and entry.tokens[0] != (probe[0] if len(probe) else -1):
                continue
            n = shared_prefix(entry.tokens, probe)
            if n >= MIN_TOKENS and (best is None or n > best.length):
                best = Hit(entry, tier, n)
        return best

    def load(self, hit: Hit) -> bytearray | None:
        """The state bytes of a hit (read and verified from disk if it is only there), or
        None if the file turned out damaged (then it is dropped: a miss)."""
        entry = hit.entry
        with self._lock:
            if entry.data is not None:
                self._ram.move_to_end(entry.key)
                self.stats.hits["ram"] += 1
                return entry.data
        data = self._read(entry)
        with self._lock:
            if data is None:
                self.stats.damaged += 1
                self._forget_disk(entry)
                return None
            self.stats.hits["disk"] += 1
            if entry.key in self._disk:
                self._disk.move_to_end(entry.key)
        if entry.path is not None:
            try:
                os.utime(entry.path)  # last use survives a restart
            except OSError:
                pass
        return data

    # ------------------------------------------------------------------ storing

    def put(self, tokens: Sequence[int], data: bytearray) -> None:
        """Store a state for `tokens` (the engine thread hands over its copy): into the RAM
        LRU, and written through to disk in the background. Entries for shorter prefixes of
        the same tokens are dropped (this one serves them all)."""
        if len(tokens) < MIN_TOKENS or not data:
            return
        array = as_tokens(tokens).copy()
        entry = Entry(prefix_key(array), array, len(data), data)
        with self._lock:
            self.stats.saved += 1
            self._drop_dominated(entry)
            old = self._ram.pop(entry.key, None)
            if old is not None:
                self._ram_bytes -= old.size
            if entry.size <= self.ram_budget:
                self._ram[entry.key] = entry
                self._ram_bytes += entry.size
                self._trim_ram()
        if self.directory is not None and entry.size <= self.disk_budget:
            future = self._writer.submit(self._write, entry, data)
            with self._lock:
                self._writes.add(future)
            future.add_done_callback(self._write_done)

    def flush(self) -> None:
        """Wait until every pending file write is done (clean shutdown)."""
        while True:
            with self._lock:
                pending = list(self._writes)
            if not pending:
                return
            for future in pending:
                try:
                    future.result()
                except Exception:  # logged by _write
                    pass

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"ram_bytes": self._ram_bytes, "ram_entries": len(self._ram),
                    "disk_bytes": self._disk_bytes, "disk_entries": len(self._disk)}

    # ------------------------------------------------------------------ internals

    def _drop_dominated(self, new: Entry) -> None:
        """Entries whose tokens are a prefix of `new`'s (a discussion's earlier turns)."""
        for tier in (self._ram, self._disk):
            for key, entry in list(tier.items()):
                n = len(entry.tokens)
                if key != new.key and n < len(new.tokens) and \
                        np.array_equal(new.tokens[:n], entry.tokens):
                    entry.superseded = True
                    if tier is self._ram:
                        del self._ram[key]
                        self._ram_bytes -= entry.size
                        entry.data = None
                    else:
                        self._forget_disk(entry)

    def _trim_ram(self) -> None:
        while self._ram_bytes > self.ram_budget and self._ram:
            _, entry = self._ram.popitem(last=False)
            self._ram_bytes -= entry.size
            entry.data = None  # the disk copy (if written) stays indexed

    def _forget_disk(self, entry: Entry) -> None:
        if self._disk.pop(entry.key, None) is not None:
            self._disk_bytes -= entry.size
        if entry.path is not None:
            try:
                entry.path.unlink(missing_ok=True)
            except OSError:
                log.warning("cannot remove the KV cache file %s", entry.path)

    def _header(self, entry: Entry) -> bytes:
        return json.dumps({"meta": self.meta, "n_tokens": len(entry.tokens),
                           "state_size": entry.size, "crc32": entry.crc},
                          sort_keys=True).encode("utf-8")

    def _write(self, entry: Entry, data: bytearray) -> None:
        """On the writer thread: write the entry's file atomically, then index it (`data`
        is held here: the RAM tier may have let go of it meanwhile)."""
        assert self.directory is not None
        if entry.superseded:  # a longer sequence came first: this one is not needed
            return
        entry.crc = zlib.crc32(data)  # here, not on the engine thread
        header = self._header(entry)
        target = self.directory / f"{entry.key}{SUFFIX}"
        fd, tmp = tempfile.mkstemp(prefix=".kv.", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header)
                f.write(entry.tokens.tobytes())
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            log.warning("cannot write the KV cache file %s: %s", target, exc)
            return
        on_disk = Entry(entry.key, entry.tokens, entry.size, None, target, entry.crc)
        with self._lock:
            if entry.superseded:  # superseded while it was being written
                target.unlink(missing_ok=True)
                return
            old = self._disk.pop(entry.key, None)
            if old is not None:
                self._disk_bytes -= old.size
            self._disk[entry.key] = on_disk
            self._disk_bytes += on_disk.size
            ram = self._ram.get(entry.key)
            if ram is not None:
                ram.path = target
            self._trim_disk()

    def _write_done(self, future: Future[None]) -> None:
        with self._lock:
            self._writes.discard(future)

    def _trim_disk(self) -> None:
        while self._disk_bytes > self.disk_budget and self._disk:
            _, entry = next(iter(self._disk.items()))
            self._forget_disk(entry)

    def _read_header(self, f: Any) -> dict[str, Any] | None:
        if f.read(len(MAGIC)) != MAGIC:
            return None
        raw_len = f.read(4)
        if len(raw_len) != 4:
            return None
        (n,) = struct.unpack("<I", raw_len)
        if n > 1 << 20:
            return None
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return header if isinstance(header, dict) else None

    def _read(self, entry: Entry) -> bytearray | None:
        """The state bytes of a disk entry, verified (metadata, size, checksum)."""
        path = entry.path
        if path is None:
            return None
        try:
            with path.open("rb") as f:
                header = self._read_header(f)
                if header is None or header.get("meta") != self.meta:
                    log.info("KV cache miss: %s has another format or model", path.name)
                    return None
                n_tokens = int(header["n_tokens"])
                tokens = np.frombuffer(f.read(4 * n_tokens), dtype="<i4")
                if len(tokens) != n_tokens or not np.array_equal(tokens, entry.tokens):
                    log.info("KV cache miss: %s is damaged (tokens)", path.name)
                    return None
                data = bytearray(entry.size)
                got = f.readinto(data)
                if got != entry.size or f.read(1) or zlib.crc32(data) != header["crc32"]:
                    log.info("KV cache miss: %s is damaged (state)", path.name)
                    return None
        except (OSError, KeyError, TypeError, ValueError) as exc:
            log.info("KV cache miss: cannot read %s: %s", path.name, exc)
            return None
        return data

    def _scan(self) -> None:
        """Index the files of an earlier run whose metadata matches (oldest use first)."""
        assert self.directory is not None
        found: list[tuple[float, Entry]] = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            try:
                with path.open("rb") as f:
                    header = self._read_header(f)
                    if header is None or header.get("meta") != self.meta:
                        continue  # another model or format: kept for it, not indexed here
                    n_tokens = int(header["n_tokens"])
                    raw = f.read(4 * n_tokens)
                size = int(header["state_size"])
                if len(raw) != 4 * n_tokens:
                    continue  # truncated in its tokens; the state is verified on load
                tokens = np.frombuffer(raw, dtype="<i4").copy()
                if prefix_key(tokens) != path.stem:
                    continue
                entry = Entry(path.stem, tokens, size, None, path, int(header["crc32"]))
                found.append((path.stat().st_mtime, entry))
            except (OSError, KeyError, TypeError, ValueError):
                continue
        for _, entry in sorted(found, key=lambda item: item[0]):
            self._disk[entry.key] = entry
            self._disk_bytes += entry.size
        self._trim_disk()
        for leftover in self.directory.glob(".kv.*"):  # a write interrupted by a crash
            leftover.unlink(missing_ok=True)
        if found:
            log.info("KV cache: %d stored sequence(s) found on disk (%.1f MB)",
                     len(self._disk), self._disk_bytes / 1e6)
