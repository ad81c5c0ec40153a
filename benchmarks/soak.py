"""Soak: one lollms_fast server process under mixed load for minutes, checked against a ledger.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--json soak.json] [--model PATH]

What runs, all against one server started by `servers.lollms_server` (the real model, 8
slots, the default personality with sampling, n_predict 128):
- 8 Socket.IO clients (`clients.LollmsClient`: cookie session, delta mode) keep answers
  streaming, each in discussions of its own (a new one every few answers);
- 50 REST clients, each with its own connection and cookie and a short random pause between
  operations, create, read, list, rename (edit_title), edit (update_message), rank up and
  down, delete messages and discussions, export (theirs and everything) and import, each
  on discussions of its own, so every answer can be checked exactly;
- a probe process (this script with `--probe`) asks GET /health every 50 ms over one
  keep-alive connection and keeps each latency: the worst is an upper bound of the longest
  event-loop stall (it includes the probe's own scheduling on a busy machine);
- the server's RSS (psutil) once a second, and the size of the KV cache's RAM tier from
  /metrics (it grows by design up to kv_cache_ram_mb: the leak figure is the RSS net of it).

Every write answered with a 2xx goes into a ledger. After the run the server is stopped
(SIGINT) and its SQLite file compared with the ledger row by row: rows lost, rows
duplicated (in the file but not in the ledger; deleted rows coming back count here) and
rows changed (a field differs).

Must be 0, or the exit status is 1: errors (a non-2xx answer, an exception, an answer that
ends with finish_reason `error` or whose deltas do not add up to its final text, a read
that disagrees with the ledger) and lost / duplicated / changed rows; integrity_check must
say ok. Reported: RSS at start, after warm-up (the first tenth), in the middle and at the
end (target: growth after warm-up, net of the KV RAM tier, < 5 %), the longest probe
latency, and REST p50/p99 per tenth of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from clients import LollmsClient  # noqa: E402
from servers import lollms_server  # noqa: E402

STREAMS = 8
REST_CLIENTS = 50
N_PREDICT = 128
PROBE_INTERVAL_S = 0.05
OWN_DISCUSSIONS = 4  # a REST client deletes one before creating more
ANSWERS_PER_DISCUSSION = 6  # a streaming client then starts a new discussion
TENTHS = 10
PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "Explain how bread rises, step by step.",
    "Give me three tips for growing tomatoes.",
    "Write a poem about the sea at night.",
    "What should I pack for a week of hiking?",
    "Describe a busy market in a small town.",
]


# ------------------------------------------------------------------ the ledger


@dataclass
class Row:
    """A message as the clients' own actions say it must be in the database."""

    discussion: int
    sender: str
    content: str
    type: int
    rank: int = 0
    parent: int | None = None  # None: not known to the client, not compared


class Ledger:
    def __init__(self) -> None:
        self.titles: dict[int, str | None] = {}  # live discussions
        self.messages: dict[int, dict[int, Row]] = {}  # discussion -> message id -> row
        self.deleted_discussions: set[int] = set()
        self.deleted_messages: set[int] = set()

    def add_discussion(self, discussion: int, title: str | None,
                       rows: list[dict[str, Any]]) -> None:
        self.titles[discussion] = title
        self.messages[discussion] = {
            int(r["id"]): Row(discussion, r["sender"], r["content"], r["type"], r["rank"],
                              r["parent"]) for r in rows}

    def delete_discussion(self, discussion: int) -> None:
        del self.titles[discussion]
        self.deleted_messages.update(self.messages.pop(discussion))
        self.deleted_discussions.add(discussion)

    def delete_message(self, discussion: int, message: int) -> None:
        del self.messages[discussion][message]
        self.deleted_messages.add(message)

    def mismatch(self, discussion: int, rows: list[dict[str, Any]]) -> str | None:
        """How the server's view of a discussion differs from the ledger, or None."""
        want = self.messages[discussion]
        got = {int(r["id"]): r for r in rows}
        if got.keys() != want.keys():
            return (f"discussion {discussion}: ids {sorted(got)} != ledger {sorted(want)}")
        for mid, row in want.items():
            r = got[mid]
            if (r["sender"], r["content"], r["type"], r["rank"]) != (
                    row.sender, row.content, row.type, row.rank) or (
                    row.parent is not None and r["parent"] != row.parent):
                return f"message {mid}: {r} != ledger {row}"
        return None


def check_database(db: Path, ledger: Ledger) -> dict[str, Any]:
    """The SQLite file (server stopped) against the ledger."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        integrity = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        titles = dict(conn.execute("SELECT id, title FROM discussion").fetchall())
        stored = {r[0]: r[1:] for r in conn.execute(
            "SELECT id, discussion_id, sender, content, type, rank, parent FROM message")}
    finally:
        conn.close()
    want = {mid: row for rows in ledger.messages.values() for mid, row in rows.items()}
    lost = len(ledger.titles.keys() - titles.keys()) + len(want.keys() - stored.keys())
    duplicated = len(titles.keys() - ledger.titles.keys()) + len(stored.keys() - want.keys())
    resurrected = (len(titles.keys() & ledger.deleted_discussions)
                   + len(stored.keys() & ledger.deleted_messages))
    changed = sum(titles[d] != t for d, t in ledger.titles.items() if d in titles)
    for mid, row in want.items():
        got = stored.get(mid)
        if got is None:
            continue
        discussion, sender, content, type_, rank, parent = got
        if (discussion, sender, content, type_, rank) != (
                row.discussion, row.sender, row.content, row.type, row.rank) or (
                row.parent is not None and parent != row.parent):
            changed += 1
    return {"integrity": integrity, "discussions": len(titles), "messages": len(stored),
            "lost": lost, "duplicated": duplicated, "resurrected": resurrected,
            "changed": changed}


# ------------------------------------------------------------------ measurements


@dataclass
class Recorder:
    t0: float
    duration: float
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds)
    answers: list[tuple[float, int]] = field(default_factory=list)  # (t, characters)
    finish_reasons: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def error(self, what: str) -> None:
        self.errors.append(what)
        if len(self.errors) <= 20:
            print(f"  error at {self.now():.1f} s: {what}", flush=True)

    def tenth(self, t: float) -> int:
        return min(TENTHS - 1, max(0, int(t / self.duration * TENTHS)))


class Unexpected(Exception):
    """A non-2xx answer the client did not expect."""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# ------------------------------------------------------------------ REST clients


class RestClient:
    def __init__(self, url: str, n: int, ledger: Ledger, rec: Recorder, seed: int) -> None:
        self.n = n
        self.ledger = ledger
        self.rec = rec
        self.rng = random.Random(seed)
        self.http = aiohttp.ClientSession(
            base_url=url, cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=120))
        self.own: list[int] = []
        self.seq = 0

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        start = time.perf_counter()
        async with self.http.request(method, path, **kwargs) as resp:
            body = await resp.read()
        self.rec.latencies.append((start - self.rec.t0, time.perf_counter() - start))
        if resp.status != 200:
            raise Unexpected(f"{method} {path} -> {resp.status}: {body[:200]!r}")
        return orjson.loads(body)

    def pick_discussion(self) -> int:
        return self.rng.choice(self.own)

    def pick_message(self) -> tuple[int, int] | None:
        candidates = [(d, m) for d in self.own for m in self.ledger.messages[d]]
        return self.rng.choice(candidates) if candidates else None

    def next_op(self) -> str:
        if not self.own:
            return self.rng.choice(["create", "import"])
        ops = {"read": 25, "list": 5, "edit_title": 10, "update_message": 10, "rank_up": 6,
               "rank_down": 4, "delete_message": 4, "export": 8, "export_all": 1,
               "import": 6, "create": 8, "delete_discussion": 5}
        if len(self.own) >= OWN_DISCUSSIONS:
            ops.update({"create": 0, "import": 0, "delete_discussion": 15})
        names = list(ops)
        return self.rng.choices(names, weights=[ops[k] for k in names])[0]

    async def run(self, deadline: float, think_s: float) -> None:
        while time.perf_counter() < deadline:
            op = self.next_op()
            try:
                await getattr(self, "op_" + op)()
                self.rec.ops[op] += 1
            except Exception as exc:
                self.rec.error(f"rest {self.n} {op}: {type(exc).__name__}: {exc}")
            await asyncio.sleep(self.rng.uniform(0, 2 * think_s))

    def title(self, what: str) -> str:
        self.seq += 1
        return f"rest {self.n} {what} {self.seq} ✓"

    def verify(self, discussion: int, rows: list[dict[str, Any]], how: str) -> None:
        problem = self.ledger.mismatch(discussion, rows)
        if problem:
            self.rec.error(f"rest {self.n} {how}: {problem}")

    # ---------------------------------------------------------- operations

    async def op_create(self) -> None:
        title = self.title("discussion")
        discussion = int((await self.call("GET", "/new_discussion",
                                          params={"title": title}))["id"])
        rows = await self.call("POST", "/load_discussion", json={"id": discussion})
        self.ledger.add_discussion(discussion, title, rows)
        self.own.append(discussion)

    async def op_import(self) -> None:
        batch = []
        for _ in range(self.rng.randint(1, 3)):
            n = self.rng.randint(2, 6)
            batch.append({"title": self.title("import"), "messages": [
                {"id": 100 + i, "sender": "user" if i % 2 == 0 else "lollms",
                 "content": f"imported by {self.n}, line {i}: ünïcödé ✓ " * (1 + i % 3),
                 "type": 0, "rank": i, "parent": 99 + i, "created_at": None}
                for i in range(n)]})
        ids = (await self.call("POST", "/import_multiple_discussions",
                               json={"jArray": batch}))["ids"]
        if len(ids) != len(batch):
            raise Unexpected(f"import answered {len(ids)} ids for {len(batch)} discussions")
        for discussion, sent in zip(ids, batch, strict=True):
            rows = await self.call("POST", "/load_discussion", json={"id": discussion})
            contents = [(r["sender"], r["content"], r["rank"]) for r in rows]
            expected = [(m["sender"], m["content"], m["rank"]) for m in sent["messages"]]
            parents = [r["parent"] for r in rows]
            if contents != expected or parents != [-1] + [r["id"] for r in rows[:-1]]:
                self.rec.error(f"rest {self.n} import: discussion {discussion} came back "
                               f"different: {rows}")
            self.ledger.add_discussion(int(discussion), sent["title"], rows)
            self.own.append(int(discussion))

    async def op_read(self) -> None:
        discussion = self.pick_discussion()
        rows = await self.call("POST", "/load_discussion", json={"id": discussion})
        self.verify(discussion, rows, "read")

    async def op_list(self) -> None:
        listed = {i["id"]: i["title"] for i in await self.call("GET", "/list_discussions")}
        for discussion in self.own:
            if listed.get(discussion, ...) != self.ledger.titles[discussion]:
                self.rec.error(f"rest {self.n} list: discussion {discussion} is "
                               f"{listed.get(discussion, 'missing')!r}")

    async def op_edit_title(self) -> None:
        discussion = self.pick_discussion()
        title = self.title("renamed")
        await self.call("POST", "/edit_title", json={"id": discussion, "title": title})
        self.ledger.titles[discussion] = title

    async def op_update_message(self) -> None:
        picked = self.pick_message()
        if picked is None:
            return
        discussion, message = picked
        content = f"edited by {self.n} ({self.seq}) — ünïcödé ✓ " + "x" * self.rng.randint(0, 300)
        self.seq += 1
        await self.call("GET", "/update_message", params={"id": message, "message": content})
        self.ledger.messages[discussion][message].content = content

    async def _rank(self, route: str, delta: int) -> None:
        picked = self.pick_message()
        if picked is None:
            return
        discussion, message = picked
        row = self.ledger.messages[discussion][message]
        reply = await self.call("GET", route, params={"id": message})
        if reply.get("new_rank") != row.rank + delta:
            self.rec.error(f"rest {self.n} {route}: rank {reply} != {row.rank + delta}")
        row.rank += delta

    async def op_rank_up(self) -> None:
        await self._rank("/message_rank_up", 1)

    async def op_rank_down(self) -> None:
        await self._rank("/message_rank_down", -1)

    async def op_delete_message(self) -> None:
        picked = self.pick_message()
        if picked is None:
            return
        discussion, message = picked
        await self.call("GET", "/delete_message", params={"id": message})
        self.ledger.delete_message(discussion, message)

    async def op_delete_discussion(self) -> None:
        discussion = self.pick_discussion()
        await self.call("POST", "/delete_discussion", json={"id": discussion})
        self.own.remove(discussion)
        self.ledger.delete_discussion(discussion)

    def verify_export(self, items: list[dict[str, Any]], how: str) -> None:
        by_id = {int(i["id"]): i for i in items}
        for discussion in self.own:
            item = by_id.get(discussion)
            if item is None or item["title"] != self.ledger.titles[discussion]:
                self.rec.error(f"rest {self.n} {how}: discussion {discussion} missing or "
                               f"renamed")
                continue
            self.verify(discussion, item["messages"], how)

    async def op_export(self) -> None:
        items = await self.call("POST", "/export_multiple_discussions",
                                json={"discussion_ids": self.own})
        if len(items) != len(self.own):
            self.rec.error(f"rest {self.n} export: {len(items)} of {len(self.own)}")
        self.verify_export(items, "export")

    async def op_export_all(self) -> None:
        self.verify_export(await self.call("GET", "/export"), "export_all")

    async def close(self) -> None:
        await self.http.close()


# ------------------------------------------------------------------ streaming clients


async def stream_loop(n: int, client: LollmsClient, ledger: Ledger, rec: Recorder,
                      stopping: asyncio.Event) -> None:
    """Answers one after another, a new discussion every few; each answer into the ledger."""
    rng = random.Random(1000 + n)
    answered = leaf = discussion = 0
    bot = ""
    try:
        while not stopping.is_set():
            if answered % ANSWERS_PER_DISCUSSION == 0:
                title = f"stream {n} discussion {answered // ANSWERS_PER_DISCUSSION}"
                async with client.http.get("/new_discussion", params={"title": title}) as r:
                    if r.status != 200:
                        raise Unexpected(f"new_discussion -> {r.status}")
                    created = await r.json()
                discussion, bot = int(created["id"]), str(created["sender"])
                rows = await client.load_discussion(discussion)
                ledger.add_discussion(discussion, title, rows)
                leaf = int(rows[-1]["id"])
            prompt = rng.choice(PROMPTS)
            stream = await client.generate(prompt, timeout=600)
            answered += 1
            rec.finish_reasons[stream.finish_reason] += 1
            if stream.finish_reason not in ("stop", "length", "cancelled"):
                rec.error(f"stream {n}: an answer ended with {stream.finish_reason!r}")
            if stream.ai_message_id is None or stream.user_message_id is None:
                rec.error(f"stream {n}: an answer without message ids")
                continue
            user, ai = int(stream.user_message_id), int(stream.ai_message_id)
            rows_of = ledger.messages[discussion]
            rows_of[user] = Row(discussion, "user", prompt, 0, 0, leaf)
            rows_of[ai] = Row(discussion, bot, stream.text, 0, 0, user)
            leaf = ai
            rec.answers.append((rec.now(), len(stream.text)))
        await asyncio.sleep(0.3)  # pieces of an ended answer arriving late are counted
        late = sum(s.late_pieces for s in client.finished)
        if late:
            rec.error(f"stream {n}: {late} piece(s) arrived after their final")
    except Exception as exc:
        rec.error(f"stream {n}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ the probe


def probe(url: str, interval: float) -> None:
    """Child process: GET /health every `interval` s over one keep-alive connection (with
    the session cookie it was given, as a browser would) until stdin closes; then prints
    `[[t, seconds, status], ...]` (t: time.monotonic(), the same clock as the parent's)."""
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    cookie = ""
    samples: list[tuple[float, float, int]] = []
    due = time.monotonic()
    while not stop.is_set():
        start = time.monotonic()
        try:
            conn.request("GET", "/health", headers={"Cookie": cookie} if cookie else {})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
            if not cookie and resp.getheader("Set-Cookie"):
                cookie = str(resp.getheader("Set-Cookie")).split(";")[0]
        except (OSError, http.client.HTTPException):
            status = 0
            conn.close()
        samples.append((start, time.monotonic() - start, status))
        due = max(due + interval, time.monotonic())
        stop.wait(due - time.monotonic())
    print(json.dumps(samples), flush=True)


class Probe:
    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--probe", url], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)

    def finish(self) -> list[tuple[float, float, int]]:
        out, _ = self.proc.communicate("", timeout=120)
        return [(float(t), float(s), int(status)) for t, s, status in json.loads(out)]


# ------------------------------------------------------------------ the run


async def kv_ram_mb(http: aiohttp.ClientSession) -> float:
    """The KV cache's host-RAM tier (SPEC 10) from /metrics: it grows by design up to
    kv_cache_ram_mb, so the leak figure is the RSS net of it."""
    async with http.get("/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "lollms_kv_cache_bytes":
            return sum(s.value for s in family.samples if s.labels.get("tier") == "ram") / 2**20
    return 0.0


async def sample_rss(url: str, pid: int, rec: Recorder,
                     samples: list[tuple[float, float, float]], stopping: asyncio.Event
                     ) -> None:
    """(t, RSS MiB, KV RAM tier MiB) every second."""
    process = psutil.Process(pid)
    async with aiohttp.ClientSession(base_url=url) as http:
        while True:
            samples.append((rec.now(), process.memory_info().rss / 2**20,
                            await kv_ram_mb(http)))
            if stopping.is_set():
                return
            try:
                await asyncio.wait_for(stopping.wait(), 1.0)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                pass


def at(samples: list[tuple[float, float, float]], t: float) -> tuple[float, float, float]:
    return min(samples, key=lambda s: abs(s[0] - t))


@dataclass
class Run:
    ledger: Ledger
    rec: Recorder
    rss: list[tuple[float, float, float]]  # (t, RSS MiB, KV RAM tier MiB)
    probe: list[tuple[float, float, int]]  # (t, seconds, HTTP status)


async def soak(url: str, pid: int, duration: float, think_s: float, n_streams: int,
               n_rest: int) -> Run:
    ledger = Ledger()
    rec = Recorder(0.0, duration)
    probe_proc = Probe(url)  # started first: it is running by the time the load starts
    streams = [await LollmsClient(url).open() for _ in range(n_streams)]
    rest = [RestClient(url, n, ledger, rec, seed=n) for n in range(n_rest)]
    # the run's clock starts now (the probe's samples are on time.monotonic())
    rec.t0, mono0 = time.perf_counter(), time.monotonic()
    stopping = asyncio.Event()
    rss: list[tuple[float, float, float]] = []
    rss_task = asyncio.ensure_future(sample_rss(url, pid, rec, rss, stopping))
    stream_tasks = [asyncio.ensure_future(stream_loop(n, c, ledger, rec, stopping))
                    for n, c in enumerate(streams)]
    await asyncio.gather(asyncio.sleep(duration),
                         *(c.run(rec.t0 + duration, think_s) for c in rest))
    stopping.set()
    for client in streams:  # the answers running now end as `cancelled`, saved as sent
        await client.stop()
    await asyncio.gather(*stream_tasks, rss_task)
    for client in [*streams, *rest]:
        await client.close()
    probe = [(t - mono0, s, status) for t, s, status in probe_proc.finish() if t >= mono0]
    bad = [(t, status) for t, _s, status in probe if status != 200]
    if bad:
        rec.error(f"probe: {len(bad)} /health answer(s) not 200, first {bad[0]}")
    return Run(ledger, rec, rss, probe)


def figures(run: Run, db: dict[str, Any], minutes: float, streams: int,
            rest_clients: int) -> dict[str, Any]:
    rec = run.rec
    per_tenth = []
    for k in range(TENTHS):
        lat = [s for t, s in rec.latencies if rec.tenth(t) == k]
        probe = [s for t, s, _ in run.probe if rec.tenth(t) == k]
        per_tenth.append({
            "from_s": round(k * rec.duration / TENTHS, 1),
            "rest_requests": len(lat),
            "rest_p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "rest_p99_ms": round(pct(lat, 0.99) * 1000, 2) if lat else None,
            "probe_max_ms": round(max(probe) * 1000, 1) if probe else None,
            "answers": sum(1 for t, _ in rec.answers if rec.tenth(t) == k),
        })
    start, warm = run.rss[0], at(run.rss, rec.duration / TENTHS)
    middle, end = at(run.rss, rec.duration / 2), run.rss[-1]
    latencies = [s for _, s in rec.latencies]
    probe_all = [s for _, s, _ in run.probe]
    return {
        "minutes": minutes,
        "streams": streams, "rest_clients": rest_clients, "n_predict": N_PREDICT,
        "errors": len(rec.errors), "error_samples": rec.errors[:20],
        "lost_rows": db["lost"], "duplicated_rows": db["duplicated"],
        "changed_rows": db["changed"], "resurrected_rows": db["resurrected"],
        "integrity": db["integrity"],
        "database": {"discussions": db["discussions"], "messages": db["messages"]},
        "answers": len(rec.answers),
        "answer_chars": sum(c for _, c in rec.answers),
        "finish_reasons": dict(rec.finish_reasons),
        "rest_requests": len(latencies),
        "rest_ops": dict(rec.ops),
        "rest_p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "rest_p99_ms": round(pct(latencies, 0.99) * 1000, 2) if latencies else None,
        "rss_mb": {"start": round(start[1], 1), "after_warmup": round(warm[1], 1),
                   "middle": round(middle[1], 1), "end": round(end[1], 1)},
        "kv_ram_tier_mb": {"start": round(start[2], 1), "after_warmup": round(warm[2], 1),
                           "middle": round(middle[2], 1), "end": round(end[2], 1)},
        "rss_growth_after_warmup_pct": round((end[1] / warm[1] - 1) * 100, 2),
        # the leak figure: RSS net of the KV cache's RAM tier, which grows by design
        "rss_net_growth_after_warmup_pct": round(
            ((end[1] - end[2]) / (warm[1] - warm[2]) - 1) * 100, 2),
        "probe_requests": len(probe_all),
        "longest_stall_ms": round(max(probe_all) * 1000, 1) if probe_all else None,
        "probe_p50_ms": round(statistics.median(probe_all) * 1000, 2) if probe_all else None,
        "per_tenth": per_tenth,
    }


def must_be_zero(f: dict[str, Any]) -> list[str]:
    failed = [k for k in ("errors", "lost_rows", "duplicated_rows", "changed_rows",
                          "resurrected_rows") if f[k]]
    if f["integrity"] != "ok":
        failed.append("integrity")
    return failed


def print_report(f: dict[str, Any]) -> None:
    print(f"\nsoak: {f['minutes']:g} min, {f['streams']} streaming clients "
          f"({f['answers']} answers: {f['finish_reasons']}), {f['rest_clients']} REST clients "
          f"({f['rest_requests']} requests), load average {f['load_before']} -> "
          f"{f['load_after']}")
    print(f"must be 0:  errors {f['errors']}  lost {f['lost_rows']}  duplicated "
          f"{f['duplicated_rows']}  changed {f['changed_rows']}  resurrected "
          f"{f['resurrected_rows']}  (integrity_check: {f['integrity']}; "
          f"{f['database']['discussions']} discussions, {f['database']['messages']} "
          f"messages checked)")
    r, kv = f["rss_mb"], f["kv_ram_tier_mb"]
    print(f"RSS MiB:    start {r['start']}  after warm-up {r['after_warmup']}  middle "
          f"{r['middle']}  end {r['end']}  (growth after warm-up "
          f"{f['rss_growth_after_warmup_pct']:+.2f} %)")
    print(f"  net of the KV RAM tier ({kv['after_warmup']} -> {kv['end']} MiB): growth "
          f"after warm-up {f['rss_net_growth_after_warmup_pct']:+.2f} % (target < 5 %)")
    print(f"stall:      longest /health latency {f['longest_stall_ms']} ms (p50 "
          f"{f['probe_p50_ms']} ms, {f['probe_requests']} probes every "
          f"{PROBE_INTERVAL_S * 1000:.0f} ms)")
    print(f"REST:       p50 {f['rest_p50_ms']} ms  p99 {f['rest_p99_ms']} ms overall")
    print(f"{'from s':>8} {'requests':>9} {'p50 ms':>8} {'p99 ms':>8} {'stall ms':>9} "
          f"{'answers':>8}")
    for row in f["per_tenth"]:
        print(f"{row['from_s']:>8} {row['rest_requests']:>9} {row['rest_p50_ms']!s:>8} "
              f"{row['rest_p99_ms']!s:>8} {row['probe_max_ms']!s:>9} {row['answers']:>8}")
    for line in f["error_samples"]:
        print(f"  error: {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="how long the load runs (fractions allowed; default 10)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--kv-ram-mb", type=int, default=None,
                        help="the server's kv_cache_ram_mb (default: its default, 1024)")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the embedded model)")
    parser.add_argument("--think-ms", type=float, default=250.0,
                        help="mean pause of a REST client between operations (default 250)")
    parser.add_argument("--streams", type=int, default=STREAMS,
                        help=f"Socket.IO clients streaming answers (default {STREAMS})")
    parser.add_argument("--rest-clients", type=int, default=REST_CLIENTS,
                        help=f"REST clients (default {REST_CLIENTS})")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe, PROBE_INTERVAL_S)
        return 0
    if args.model is None:
        from lollms_fast.modelfiles import ensure_default_model
        args.model = ensure_default_model(HERE.parent / ".cache" / "models")

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        data_dir = Path(tmp) / "data"
        server = lollms_server(
            model=args.model.resolve(), data_dir=data_dir, n_predict=N_PREDICT, threads=2,
            ctx_size=2048, parallel=STREAMS, log_path=Path(tmp) / "server.log",
            # the default personality's layout, sampling as a user would run it
            extra_env={"LOLLMS_TEMPERATURE": "0.9", "LOLLMS_REPEAT_PENALTY": "1.2",
                       "LOLLMS_SEED": "-1",
                       **({} if args.kv_ram_mb is None
                          else {"LOLLMS_KV_CACHE_RAM_MB": str(args.kv_ram_mb)})}).start()
        try:
            run = asyncio.run(soak(server.url, server.pid, args.minutes * 60,
                                   args.think_ms / 1000, args.streams, args.rest_clients))
            died = server.proc is not None and server.proc.poll() is not None
        finally:
            server.stop()
        if died:
            run.rec.error("the server exited during the run; log: "
                          + (Path(tmp) / "server.log").read_text(errors="replace")[-2000:])
        db = check_database(data_dir / "databases" / "database.db", run.ledger)
    f = figures(run, db, args.minutes, args.streams, args.rest_clients)
    f["load_before"], f["load_after"] = load_before, [round(x, 2) for x in os.getloadavg()]
    f["cpus"] = os.cpu_count()
    print_report(f)
    if args.json:
        args.json.write_text(json.dumps(f, indent=2) + "\n", encoding="utf-8")
    failed = must_be_zero(f)
    if failed:
        print(f"FAILED: {', '.join(failed)} not zero")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
