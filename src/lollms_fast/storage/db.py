"""The SQLite database: connections, pragmas, versioned migrations, one writer, a reader pool.

Every write goes through one dedicated thread (a single-worker executor is a thread fed by a
queue), so writers never contend for the lock; reads run on a small pool of threads, each
with its own connection (WAL lets them read while the writer writes). The event loop only
awaits futures.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .base import StorageError, transaction
from .migrations import migrate

log = logging.getLogger("lollms_fast.storage")

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000


def connect(path: Path, *, durable: bool = False) -> sqlite3.Connection:
    """A connection with this project's pragmas; autocommit mode (transactions explicit)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class Database:
    """Open with `await Database.open(path)`; close with `await db.close()`."""

    def __init__(self, path: Path, *, durable: bool = False, readers: int = 4) -> None:
        self.path = path
        self.durable = durable
        self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer")
        self._reader_pool = ThreadPoolExecutor(max_workers=readers,
                                               thread_name_prefix="db-reader")
        self._writer: sqlite3.Connection | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self.schema_version = 0

    @classmethod
    async def open(cls, path: Path, *, durable: bool = False, readers: int = 4) -> Database:
        db = cls(path, durable=durable, readers=readers)
        await db.start()
        return db

    async def start(self) -> None:
        """Open the writer connection and migrate the schema (on the writer thread)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer_pool, self._open_writer)
        except BaseException:
            self._shutdown_pools()
            raise

    def _open_writer(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path, durable=self.durable)
        except OSError as exc:
            raise StorageError(f"cannot create the database {self.path}: "
                               f"{exc.strerror or exc}") from None
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot open the database {self.path}: {exc}") from None
        try:
            self.schema_version = migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._writer = conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, durable=self.durable)
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._writer
        if conn is None:
            raise RuntimeError("the database is closed")
        with transaction(conn):
            return fn(conn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader()
        # one snapshot for the whole function, even if it runs several queries
        with transaction(conn, "BEGIN"):
            return fn(conn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in one transaction on the writer thread (rolled back if it raises)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer_pool, self._run_write, fn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on a reader thread, inside one read transaction (a consistent view)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader_pool, self._run_read, fn)

    def _close_writer(self) -> None:
        if self._writer is not None:
            try:
                self._writer.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            self._writer.close()
            self._writer = None

    def _shutdown_pools(self) -> None:
        self._reader_pool.shutdown(wait=True)
        self._writer_pool.shutdown(wait=True)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer_pool, self._close_writer)
        await asyncio.to_thread(self._shutdown_pools)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
