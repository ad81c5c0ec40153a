"""`lollms-fast migrate --from URL --to URL`: every discussion and message from one store into
an empty other, ids and dates kept exactly, then verified row by row.

The source is never modified. A SQLite source is first copied (SQLite's backup API, from a
read-only connection) into a temporary file, and that copy is migrated forward: a database
from the 2023 server (schema version 3 or older) works.

What a copy cannot carry as it is is refused before anything is written, with the ids, and an
option to carry it anyway (nothing is ever dropped quietly):
- messages whose discussion no longer exists (2023 servers left some): `--adopt-orphans`
  recreates each missing discussion, with its old id and a title saying so;
- text with U+0000 going to PostgreSQL (which cannot store it): `--replace-nul` writes U+FFFD.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from ..errors import LollmsError
from . import open_store, redact_url, sqlite_path
from .base import EXPORT_BATCH, DiscussionRow, MessageRow, StorageError, Store
from .migrations import read_version

ORPHAN_TITLE = "Recovered by lollms-fast migrate: messages of deleted discussion {id}"
SHOWN = 20  # ids listed in a message at most


class MigrateRefused(LollmsError):
    """The copy cannot go ahead as asked (nothing was written)."""


@dataclass
class Report:
    source: str = ""
    destination: str = ""
    source_version: int = 0
    discussions: int = 0
    messages: int = 0
    checksum: str = ""
    adopted: list[int] = field(default_factory=list)  # recreated discussion ids
    orphans: list[int] = field(default_factory=list)  # their message ids
    nul_discussions: list[int] = field(default_factory=list)
    nul_messages: list[int] = field(default_factory=list)
    nul_replaced: bool = False


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:SHOWN])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN else "")


def _no_nul(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class _Digest:
    """A checksum of a set of rows that does not depend on their order: the sum of each
    row's SHA-256 (mod 2^256), and the count."""

    def __init__(self) -> None:
        self.total = 0
        self.count = 0

    def add(self, kind: str, row: Iterable[Any]) -> None:
        digest = hashlib.sha256(orjson.dumps([kind, *row])).digest()
        self.total = (self.total + int.from_bytes(digest, "big")) % (1 << 256)
        self.count += 1

    def hex(self) -> str:
        return f"{self.total:064x}"


# ------------------------------------------------------------------ the source


def _backup(path: Path, into: Path) -> None:
    """A consistent copy of a SQLite file through a read-only connection (the source, its
    journal and WAL stay untouched)."""
    if not path.is_file():
        raise StorageError(f"the source database {path} does not exist")
    try:
        source = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            target = sqlite3.connect(into)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"cannot read the SQLite database {path}: {exc}") from None


def _version_of(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return read_version(conn)
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"not a usable SQLite database: {exc}") from None
    finally:
        conn.close()


_MESSAGE_SELECT = ("SELECT id, sender, content, type, rank, parent, created_at, discussion_id "
                   "FROM message")


def _sqlite_orphans(path: Path) -> list[MessageRow]:
    """Messages whose discussion does not exist (by id)."""
    conn = sqlite3.connect(path)
    try:
        rows: list[MessageRow] = conn.execute(
            f"{_MESSAGE_SELECT} WHERE discussion_id NOT IN (SELECT id FROM discussion) "
            f"ORDER BY id").fetchall()
        return rows
    finally:
        conn.close()


def _sqlite_counts(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        return (conn.execute("SELECT count(*) FROM discussion").fetchone()[0],
                conn.execute("SELECT count(*) FROM message").fetchone()[0])
    finally:
        conn.close()


_DISCUSSION_TYPES = ((int,), (str, type(None)), (str, type(None)))
_MESSAGE_TYPES = ((int,), (str,), (str,), (int,), (int,), (int, type(None)), (str, type(None)),
                  (int,))


def _well_typed(row: Sequence[Any], types: Sequence[tuple[type, ...]]) -> bool:
    # bool is an int, but SQLite never returns one
    return all(isinstance(v, t) for v, t in zip(row, types, strict=True))


# ------------------------------------------------------------------ the copy


async def _scan(source: Store, orphans: Sequence[MessageRow], report: Report) -> None:
    """Read the source once before writing anything: values of the wrong type are refused
    (a SQLite column can hold any type), and NUL characters are noted."""
    bad_d: list[int] = []
    bad_m: list[int] = []
    async for heads, rows in source.dump():
        ids = {d[0] for d in heads}
        rows = [m for m in rows if m[7] in ids]  # orphans in the id range come separately
        for d in heads:
            if not _well_typed(d, _DISCUSSION_TYPES):
                bad_d.append(d[0])
            elif isinstance(d[1], str) and "\x00" in d[1]:
                report.nul_discussions.append(d[0])
        for m in rows:
            if not _well_typed(m, _MESSAGE_TYPES):
                bad_m.append(m[0])
            elif "\x00" in m[1] or "\x00" in m[2]:
                report.nul_messages.append(m[0])
    for m in orphans:
        if not _well_typed(m, _MESSAGE_TYPES):
            bad_m.append(m[0])
        elif "\x00" in m[1] or "\x00" in m[2]:
            report.nul_messages.append(m[0])
    if bad_d or bad_m:
        raise MigrateRefused(
            "some rows hold values of the wrong type (e.g. a number or bytes where text is "
            f"expected), which the destination cannot store as they are: discussions "
            f"[{_ids(bad_d)}], messages [{_ids(sorted(bad_m))}]; fix them in the source first")


async def _copy(source: Store, dest: Store, orphans: Sequence[MessageRow],
                nul_fix: bool, report: Report) -> _Digest:
    """Load every row, batch by batch; returns the digest of what was written."""
    expected = _Digest()

    def fixed(row: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(_no_nul(v) for v in row) if nul_fix else tuple(row)

    async for heads, rows in source.dump():
        ids = {d[0] for d in heads}
        # a SQLite dump takes messages by a range of discussion ids: orphans inside the
        # range are not this batch's (they are copied below, or refused)
        mine = [m for m in rows if m[7] in ids]
        await dest.load(heads, mine)
        for d in heads:
            expected.add("d", fixed(d))
        for m in mine:
            expected.add("m", fixed(m))
        report.discussions += len(heads)
        report.messages += len(mine)
    if orphans:
        adopted: list[DiscussionRow] = [(i, ORPHAN_TITLE.format(id=i), None)
                                        for i in sorted({m[7] for m in orphans})]
        for start in range(0, len(adopted), EXPORT_BATCH):
            chunk = adopted[start:start + EXPORT_BATCH]
            keep = {d[0] for d in chunk}
            await dest.load(chunk, [m for m in orphans if m[7] in keep])
        for d in adopted:
            expected.add("d", d)
        for m in orphans:
            expected.add("m", fixed(m))
        report.adopted = [d[0] for d in adopted]
        report.orphans = [m[0] for m in orphans]
        report.discussions += len(adopted)
        report.messages += len(orphans)
    await dest.finish_load()
    return expected


async def _verify(dest: Store, expected: _Digest, report: Report) -> None:
    found = _Digest()
    async for heads, rows in dest.dump():
        for d in heads:
            found.add("d", d)
        for m in rows:
            found.add("m", m)
    if (found.count, found.hex()) != (expected.count, expected.hex()):
        raise MigrateRefused(
            f"verification failed: the destination holds {found.count} rows (checksum "
            f"{found.hex()[:16]}), the source gave {expected.count} ({expected.hex()[:16]}); "
            f"the destination is incomplete: empty it before trying again")
    report.checksum = expected.hex()


def _same_database(a: str, b: str, root: Path) -> bool:
    sa, sb = urlsplit(a).scheme.lower(), urlsplit(b).scheme.lower()
    if sa == sb == "sqlite":
        return sqlite_path(a, root).resolve() == sqlite_path(b, root).resolve()
    pa, pb = urlsplit(a), urlsplit(b)
    return (sa != "sqlite" and sb != "sqlite" and pa.hostname == pb.hostname
            and pa.port == pb.port and pa.path == pb.path)


async def migrate_copy(from_url: str, to_url: str, *, root: Path, adopt_orphans: bool = False,
                       replace_nul: bool = False) -> Report:
    """Copy everything from `from_url` into the empty database `to_url`, then verify."""
    if _same_database(from_url, to_url, root):
        raise MigrateRefused("the source and the destination are the same database")
    report = Report()
    with tempfile.TemporaryDirectory(prefix="lollms-migrate-") as tmp:
        orphans: list[MessageRow] = []
        if urlsplit(from_url).scheme.lower() == "sqlite":
            path = sqlite_path(from_url, root)
            snapshot = Path(tmp) / "source.db"
            await asyncio.to_thread(_backup, path, snapshot)
            report.source_version = await asyncio.to_thread(_version_of, snapshot)
            source = open_store(f"sqlite:///{snapshot}", root=root)
            report.source = f"SQLite {path}"
        else:
            from .postgres import PostgresStore

            source = PostgresStore(from_url, migrate=False)  # never changes its schema
            report.source = source.describe()
        await source.start()
        try:
            if urlsplit(from_url).scheme.lower() == "sqlite":
                orphans = await asyncio.to_thread(_sqlite_orphans, snapshot)
            else:
                report.source_version = source.schema_version
            dest = open_store(to_url, root=root)
            report.destination = dest.describe()
            await dest.start()
            try:
                if not await dest.is_empty():
                    raise MigrateRefused(f"the destination {dest.describe()} is not empty: "
                                         f"migrate copies into an empty database only")
                await _scan(source, orphans, report)
                if orphans and not adopt_orphans:
                    lost = sorted({m[7] for m in orphans})
                    raise MigrateRefused(
                        f"{len(orphans)} message(s) belong to no discussion (message ids "
                        f"[{_ids([m[0] for m in orphans])}], of deleted discussions "
                        f"[{_ids(lost)}]); nothing was copied. Rerun with --adopt-orphans to "
                        f"copy them into recreated discussions with those ids, titled "
                        f"\"{ORPHAN_TITLE.format(id='N')}\"")
                to_postgres = urlsplit(to_url).scheme.lower() != "sqlite"
                nul = report.nul_discussions or report.nul_messages
                if nul and to_postgres and not replace_nul:
                    raise MigrateRefused(
                        f"PostgreSQL text cannot hold the NUL character (U+0000), found in "
                        f"discussion titles [{_ids(report.nul_discussions)}] and messages "
                        f"[{_ids(sorted(report.nul_messages))}]; nothing was copied. Rerun "
                        f"with --replace-nul to store U+FFFD in its place")
                report.nul_replaced = bool(nul and to_postgres)
                expected = await _copy(source, dest, orphans, report.nul_replaced, report)
                await _verify(dest, expected, report)
                if urlsplit(from_url).scheme.lower() == "sqlite":
                    total = await asyncio.to_thread(_sqlite_counts, snapshot)
                    copied = (report.discussions - len(report.adopted), report.messages)
                    if total != copied:
                        raise MigrateRefused(f"the source has {total[0]} discussions and "
                                             f"{total[1]} messages, {copied[0]} and "
                                             f"{copied[1]} were copied")
            finally:
                await dest.close()
        finally:
            await source.close()
    return report


def summary(report: Report) -> list[str]:
    lines = [f"from: {report.source} (schema version {report.source_version})",
             f"to:   {report.destination}",
             f"copied {report.discussions} discussions and {report.messages} messages, "
             f"ids and dates kept"]
    if report.adopted:
        lines.append(f"recovered {len(report.orphans)} orphaned message(s) "
                     f"[{_ids(report.orphans)}] into recreated discussions "
                     f"[{_ids(report.adopted)}]")
    if report.nul_replaced:
        lines.append(f"NUL replaced by U+FFFD in discussions [{_ids(report.nul_discussions)}] "
                     f"and messages [{_ids(sorted(report.nul_messages))}]")
    lines.append(f"verified: every row equal on both sides (sha256 set checksum "
                 f"{report.checksum[:16]})")
    return lines


def run(from_url: str, to_url: str, *, root: Path, adopt_orphans: bool = False,
        replace_nul: bool = False, out: Callable[[str], None] = print) -> int:
    """The command: 0 copied and verified, 1 refused or failed verification, 2 a database
    that cannot be opened. Errors go to stderr, never with a password."""
    try:
        report = asyncio.run(migrate_copy(from_url, to_url, root=root,
                                          adopt_orphans=adopt_orphans,
                                          replace_nul=replace_nul))
    except MigrateRefused as exc:
        print(f"lollms-fast migrate: refused: {exc.message}", file=sys.stderr)
        return 1
    except LollmsError as exc:
        print(f"lollms-fast migrate: error: {_scrub(exc.message, from_url, to_url)}",
              file=sys.stderr)
        return 2
    for line in summary(report):
        out(line)
    return 0


def _scrub(text: str, *urls: str) -> str:
    for url in urls:
        password = urlsplit(url).password
        if password:
            text = text.replace(url, redact_url(url)).replace(password, "***")
    return text
