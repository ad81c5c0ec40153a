"""REST latency and event-loop stalls: `/list_discussions` over 10,000 discussions and
`/load_discussion` of a 1,000-message discussion, with 1 and 16 concurrent clients, and
`/new_discussion` (a write: one discussion and two messages), on SQLite, PostgreSQL or both.

    .venv/bin/python benchmarks/bench_rest.py [--json results.json] [--requests 400]
        [--store sqlite|postgres|both] [--redis]

How it measures
- The server runs in a child process (this same script with `--serve`), exactly as
  `build_app` builds it, on 127.0.0.1, with a freshly seeded SQLite file in a temporary
  data dir. The load generator (aiohttp clients, one cookie jar each) runs in this process,
  so it does not share the server's event loop.
- Event-loop stalls are measured inside the server process by a ticker task that asks to
  wake every 5 ms and records how late it woke. The parent reads (and resets) the longest
  lateness over the child's stdin/stdout between phases, so the app needs no debug route.
  A stall figure therefore includes up to one tick of scheduling noise.
- Every response is checked while timing (10,000 discussions listed, 1,000 messages
  loaded); a wrong answer aborts the run.
- `--streams N` runs the phases while N Socket.IO clients keep answers streaming (SPEC
  target: 8); the server then starts with the model.
- `--store postgres|both`: a throwaway PostgreSQL server (Debian's, started by the test
  suite's tests/servicekit.py, fsync off as in the tests) holds a copy of the same seeded
  data (`lollms-fast migrate`'s copy, ids kept). With `both`, both servers run at once and
  every phase runs on SQLite then on PostgreSQL, so drift hits both alike; the report gives
  the PostgreSQL / SQLite ratio of each p50.
- `--redis`: one more SQLite server whose sessions live in a throwaway Redis
  (`socketio_redis_url`, as replicas run): every route that uses the client's session
  (`load_discussion`, `new_discussion`) then reads it from Redis. Interleaved like the
  stores; the report gives its p50 against the plain SQLite server.

Targets (DESIGN.md): single-client p50 < 10 ms for both routes; no stall > 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

N_DISCUSSIONS = 10_000
N_MESSAGES = 1_000
TICK_S = 0.005


# ------------------------------------------------------------------ data


def seed_database(path: Path) -> int:
    """10,000 discussions; the last one holds 1,000 messages. Returns that discussion's id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(_create_schema(path))
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany("INSERT INTO discussion (title) VALUES (?)",
                         [(f"discussion {i} — some title",) for i in range(N_DISCUSSIONS)])
        big = conn.execute("SELECT max(id) FROM discussion").fetchone()[0]
        rows = []
        for i in range(N_MESSAGES):
            sender = "user" if i % 2 == 0 else "lollms"
            content = f"message {i}: " + "lorem ipsum dolor sit amet " * 8
            rows.append((sender, content, 0, 0, i if i else -1, big))
        conn.executemany("INSERT INTO message (sender, content, type, rank, parent, "
                         "discussion_id) VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    return int(big)


async def _create_schema(path: Path) -> None:
    from lollms_fast.storage.db import Database

    db = await Database.open(path)
    await db.close()


# ------------------------------------------------------------------ server side


async def serve(data_dir: str, with_model: bool, db_url: str | None,
                redis_url: str | None) -> None:
    """Child process: the real app, a stall ticker, and a stdin command loop."""
    from aiohttp import web

    from lollms_fast.app import build_app, load_engine
    from lollms_fast.config import load_config

    flags: dict[str, Any] = {"data_dir": data_dir, "host": "127.0.0.1", "port": 0}
    if db_url:
        flags["db_url"] = db_url
    if redis_url:
        flags["socketio_redis_url"] = redis_url
    config = load_config(flags, environ={})
    app = build_app(config, backend_factory=load_engine if with_model else None)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(TICK_S)
            worst = max(worst, loop.time() - start - TICK_S)

    tick = asyncio.create_task(ticker())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"port": port}), flush=True)
    while line := (await reader.readline()).strip():
        if line == b"stall":  # report and reset the longest stall since the last ask
            print(json.dumps({"stall_ms": worst * 1000}), flush=True)
            worst = 0.0
        elif line == b"quit":
            break
    tick.cancel()
    await runner.cleanup()


class Server:
    def __init__(self, data_dir: Path, with_model: bool, db_url: str | None = None,
                 redis_url: str | None = None) -> None:
        cmd = [sys.executable, __file__, "--serve", str(data_dir)]
        if with_model:
            cmd.append("--with-model")
        env = dict(os.environ)
        if db_url:  # by the environment: a password stays out of the process list
            env["BENCH_REST_DB_URL"] = db_url
        if redis_url:
            env["BENCH_REST_REDIS_URL"] = redis_url
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.port = int(self._ask(None)["port"])
        self.url = f"http://127.0.0.1:{self.port}"

    def _ask(self, command: str | None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the server process exited")
        return json.loads(line)

    def stall_ms(self) -> float:
        return float(self._ask("stall")["stall_ms"])

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()


# ------------------------------------------------------------------ load


Request = Callable[[aiohttp.ClientSession], Awaitable[None]]


def list_request(url: str) -> Request:
    async def run(session: aiohttp.ClientSession) -> None:
        async with session.get(url + "/list_discussions") as resp:
            data = orjson.loads(await resp.read())
        # background streaming clients (--streams) add discussions of their own
        if resp.status != 200 or len(data) < N_DISCUSSIONS:
            raise AssertionError(f"/list_discussions answered wrong ({resp.status})")
    return run


def load_request(url: str, discussion_id: int) -> Request:
    async def run(session: aiohttp.ClientSession) -> None:
        async with session.post(url + "/load_discussion", json={"id": discussion_id}) as resp:
            data = orjson.loads(await resp.read())
        if resp.status != 200 or len(data) != N_MESSAGES:
            raise AssertionError(f"/load_discussion answered wrong ({resp.status})")
    return run


def write_request(url: str) -> Request:
    async def run(session: aiohttp.ClientSession) -> None:
        async with session.get(url + "/new_discussion", params={"title": "bench"}) as resp:
            data = orjson.loads(await resp.read())
        if resp.status != 200 or not isinstance(data.get("id"), int):
            raise AssertionError(f"/new_discussion answered wrong ({resp.status})")
    return run


async def run_phase(request: Request, clients: int, total: int) -> dict[str, float]:
    """`clients` concurrent clients (own connection and cookie each) share `total` requests."""
    latencies: list[float] = []
    remaining = total

    async def client() -> None:
        nonlocal remaining
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            await request(session)  # warm the connection and the session cookie
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                await request(session)
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


async def background_streams(url: str, count: int) -> Callable[[], Awaitable[None]]:
    """Start `count` Socket.IO clients that keep answers streaming (generate_msg in a loop,
    each in its own discussion) while the REST phases run; returns a coroutine function
    that stops them and reports how many answers they completed."""
    if not count:
        async def nothing() -> None:
            return None
        return nothing

    from clients import LollmsClient  # benchmarks/clients.py, the shared Socket.IO client

    clients = [await LollmsClient(url).open() for _ in range(count)]
    running = True
    answers = 0

    async def keep_streaming(client: LollmsClient) -> None:
        nonlocal answers
        await client.new_discussion()
        while running:
            stream = await client.generate("Tell me a long story about a lighthouse.")
            if stream.finish_reason == "error":
                raise RuntimeError("a background answer failed")
            answers += 1

    tasks = [asyncio.ensure_future(keep_streaming(c)) for c in clients]
    # the REST phases start once every client has its first pieces flowing
    while any(c.current is None or not c.current.piece_times for c in clients):
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.05)

    async def stop() -> None:
        nonlocal running
        running = False
        for c in clients:
            await c.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.close()
        print(f"background streams: {count} clients completed {answers} answers")

    return stop


async def bench(servers: dict[str, Server], big_id: int, requests: int, streams: int
                ) -> list[dict[str, Any]]:
    """Every phase on every store in turn (reads first: the write phase adds discussions)."""
    stops = [await background_streams(server.url, streams) for server in servers.values()]
    results: list[dict[str, Any]] = []
    phases = (("list_discussions", list_request), ("load_discussion",
              lambda url: load_request(url, big_id)), ("new_discussion", write_request))
    try:
        for name, make_request in phases:
            for clients in (1, 16):
                for store, server in servers.items():
                    server.stall_ms()  # reset
                    figures = await run_phase(make_request(server.url), clients, requests)
                    figures["max_stall_ms"] = server.stall_ms()
                    row = {"route": name, "clients": clients, "streams": streams,
                           "store": store, **figures}
                    results.append(row)
                    print(f"{name:17} {store:8} clients={clients:2} streams={streams} "
                          f"{figures['req_per_s']:8.1f} req/s  p50 {figures['p50_ms']:6.2f} ms"
                          f"  p99 {figures['p99_ms']:6.2f} ms  max stall "
                          f"{figures['max_stall_ms']:5.1f} ms", flush=True)
    finally:
        for stop in stops:
            await stop()
    return results


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each server's p50 over the plain SQLite server's, phase by phase."""
    out = []
    for row in results:
        if row["store"] == "sqlite":
            continue
        twin = next((r for r in results if r["store"] == "sqlite"
                     and r["route"] == row["route"] and r["clients"] == row["clients"]), None)
        if twin is not None:
            out.append({"store": row["store"], "route": row["route"],
                        "clients": row["clients"], "sqlite_p50_ms": round(twin["p50_ms"], 2),
                        "p50_ms": round(row["p50_ms"], 2),
                        "ratio": round(row["p50_ms"] / twin["p50_ms"], 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--requests", type=int, default=400, help="requests per phase")
    parser.add_argument("--streams", type=int, default=0,
                        help="answers streaming in the background (starts the model)")
    parser.add_argument("--with-model", action="store_true",
                        help="start the server with the model engine")
    parser.add_argument("--store", choices=("sqlite", "postgres", "both"), default="sqlite",
                        help="the discussions store(s) to measure (default sqlite)")
    parser.add_argument("--redis", action="store_true",
                        help="also a SQLite server with its sessions in Redis")
    parser.add_argument("--serve", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.with_model, os.environ.get("BENCH_REST_DB_URL"),
                          os.environ.get("BENCH_REST_REDIS_URL")))
        return

    with_model = args.with_model or args.streams > 0
    with tempfile.TemporaryDirectory(prefix="bench_rest_") as tmp, ExitStack() as stack:
        data_dir = Path(tmp)
        seed_start = time.perf_counter()
        db_file = data_dir / "databases" / "database.db"
        big_id = seed_database(db_file)
        print(f"seeded {N_DISCUSSIONS} discussions + {N_MESSAGES} messages in "
              f"{time.perf_counter() - seed_start:.1f} s", flush=True)
        servers: dict[str, Server] = {}
        if args.store in ("sqlite", "both"):
            servers["sqlite"] = Server(data_dir, with_model)
            stack.callback(servers["sqlite"].close)
        if args.store in ("postgres", "both"):
            pg_url = stack.enter_context(postgres_copy(db_file, data_dir))
            pg_dir = data_dir / "pg"
            servers["postgres"] = Server(pg_dir, with_model, pg_url)
            stack.callback(servers["postgres"].close)
        if args.redis:
            redis_url = stack.enter_context(throwaway_redis())
            if "sqlite" not in servers:
                servers["sqlite"] = Server(data_dir, with_model)
                stack.callback(servers["sqlite"].close)
            servers["sqlite+redis"] = Server(data_dir, with_model, redis_url=redis_url)
            stack.callback(servers["sqlite+redis"].close)
        results = asyncio.run(bench(servers, big_id, args.requests, args.streams))
    compared = ratios(results)
    for r in compared:
        print(f"p50 {r['store']} / sqlite  {r['route']:17} clients={r['clients']:2}  "
              f"{r['p50_ms']:6.2f} / {r['sqlite_p50_ms']:6.2f} ms = x{r['ratio']}")
    report = {
        "benchmark": "bench_rest",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "requests_per_phase": args.requests,
        "targets": {"single_client_p50_ms": 10, "max_stall_ms": 50},
        "results": results,
        "vs_sqlite": compared,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _test_helpers() -> None:
    """The throwaway servers are the test suite's own (tests/servicekit.py)."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


@contextmanager
def throwaway_redis() -> Iterator[str]:
    _test_helpers()
    from servicekit import RedisServer

    with RedisServer() as server:
        yield server.url


@contextmanager
def postgres_copy(db_file: Path, data_dir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL server holding a copy of the seeded SQLite file; its URL."""
    _test_helpers()
    from lollms_fast.storage.copy import migrate_copy
    from servicekit import PostgresServer

    with PostgresServer() as server:
        url = server.create_database()
        start = time.perf_counter()
        asyncio.run(migrate_copy(f"sqlite:///{db_file}", url, root=data_dir))
        print(f"copied to PostgreSQL in {time.perf_counter() - start:.1f} s", flush=True)
        yield url


if __name__ == "__main__":
    main()
