"""Replicas on one machine: aggregate tokens/s with 1, 2 and 3 replicas behind nginx.

    .venv/bin/python benchmarks/replicas.py [--json benchmarks/replicas.json]
        [--clients 12] [--max-tokens 64] [--rounds 2]

What runs
- One real PostgreSQL and one real Redis (Debian's, started in temporary folders by the test
  suite's tests/servicekit.py), nginx with the shipped deploy/nginx.conf (tests/proxykit.py
  changes only its listen port and its upstream lines), and K replicas, each
  `lollms-fast serve` with the real default model, n_threads 1, on its own data dir, all on
  the same database and Redis. A reference layout runs one replica with n_threads 2 (one
  process using the whole machine, as a single server would).
- The load is `lollms-fast bench` (the package's own load generator) through nginx, on
  /v1/completions (greedy, `max_tokens` each, token counts from `usage`), 4 requests per
  client, in two series:
  - *same load*: `--clients` concurrent clients whatever the layout (the replicas share
    them);
  - *load per core*: `--clients` per replica (the 2-thread reference gets twice as many:
    it has two cores).
  /v1 goes to the replica with the fewest open requests (`least_conn` in
  deploy/nginx.conf), so the requests spread; each replica's share is read from its
  /metrics (lollms_generated_tokens_total) before and after. Every replica has as many
  slots as clients, so nothing queues.
- Layouts are interleaved over `--rounds` rounds (1, 2, 3, ref, 1, 2, 3, ref, ...) and the
  median of each is kept: the machine's drift hits every layout alike. Ratios are to the
  1-replica figure of the same run.

What it can and cannot show on a 2-core machine: see docs/deployment.md ("Measured").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# the throwaway servers and the nginx wrapper are the test suite's own helpers
sys.path.insert(0, str(REPO / "tests"))

from chatkit import free_port, spawn_server  # noqa: E402
from lollms_fast.bench import BenchOptions, run  # noqa: E402
from lollms_fast.modelfiles import ensure_default_model  # noqa: E402
from proxykit import NginxServer  # noqa: E402
from servicekit import PostgresServer, RedisServer  # noqa: E402

PROMPT = "The history of the printing press begins"
_TOKENS = re.compile(r"^lollms_generated_tokens_total (\S+)$", re.M)


def generated_tokens(base: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        found = _TOKENS.search(resp.read().decode())
    return float(found.group(1)) if found else 0.0


def measure(layout: str, replicas: int, threads: int, clients: int, args: argparse.Namespace,
            model: Path, postgres: PostgresServer, redis_url: str, root: Path
            ) -> dict[str, Any]:
    db_url = postgres.create_database()
    env = {"LOLLMS_DB_URL": db_url, "LOLLMS_SOCKETIO_REDIS_URL": redis_url}
    with ExitStack() as stack:
        servers = []
        for i in range(replicas):
            data = root / f"{layout}-{time.monotonic_ns()}-{i}"
            servers.append(stack.enter_context(spawn_server(
                data, model, "--n-threads", str(threads), "--parallel", str(clients),
                "--ctx-size", "512", env=env)))
        nginx = stack.enter_context(NginxServer([s.port for s in servers], free_port(),
                                                port_header=False))
        warm = BenchOptions(url=nginx.url, clients=len(servers) * 2,
                            requests=len(servers) * 2, max_tokens=8, prompts=[PROMPT],
                            sampling={"temperature": 0.0}, progress=False)
        asyncio.run(run(warm))
        before = [generated_tokens(s.base) for s in servers]
        opts = BenchOptions(url=nginx.url, clients=clients, requests=clients * 4,
                            max_tokens=args.max_tokens, prompts=[PROMPT],
                            sampling={"temperature": 0.0}, progress=False)
        report = asyncio.run(run(opts))
        share = [generated_tokens(s.base) - b for s, b in zip(servers, before, strict=True)]
    if report["errors"]["count"]:
        raise RuntimeError(f"{layout}: {report['errors']}")
    row = {"layout": layout, "replicas": replicas, "n_threads": threads, "clients": clients,
           "aggregate_tok_s": report["aggregate_tok_s"], "tokens": report["tokens"],
           "token_count": report["token_count"], "ttft_p50_ms": report["ttft_ms"]["p50"],
           "stream_tok_s_p50": report["stream_tok_s"]["p50"],
           "tokens_per_replica": [int(t) for t in share]}
    print(f"{layout:>36}: {row['aggregate_tok_s']:7.1f} tok/s aggregate, TTFT p50 "
          f"{row['ttft_p50_ms']:7.1f} ms, tokens per replica {row['tokens_per_replica']}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--clients", type=int, default=12,
                        help="concurrent clients (same load), or per replica (load per core)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import tempfile

    model = ensure_default_model(REPO / ".cache" / "models")  # where the tests keep it
    c = args.clients
    layouts = [(f"{name}, {load}", replicas, threads, clients)
               for load, per_core in (("same load", False), ("load per core", True))
               for name, replicas, threads in (("1 replica x 1 thread", 1, 1),
                                               ("2 replicas x 1 thread", 2, 1),
                                               ("3 replicas x 1 thread", 3, 1),
                                               ("1 replica x 2 threads", 1, 2))
               for clients in [c * (max(replicas, threads) if per_core else 1)]]
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _, _ in layouts}
    started = time.monotonic()
    load_before = os.getloadavg()
    with PostgresServer() as postgres, RedisServer() as redis, \
            tempfile.TemporaryDirectory(prefix="bench_replicas_") as tmp:
        for _ in range(args.rounds):
            for name, replicas, threads, clients in layouts:
                rows[name].append(measure(name, replicas, threads, clients, args, model,
                                          postgres, redis.url, Path(tmp)))
    summary = []
    print("\nmedian of the rounds, ratio to 1 replica x 1 thread under the same series:")
    for name, replicas, threads, clients in layouts:
        series = name.split(", ", 1)[1]
        base = statistics.median(r["aggregate_tok_s"]
                                 for r in rows[f"1 replica x 1 thread, {series}"])
        median = statistics.median(r["aggregate_tok_s"] for r in rows[name])
        ttft = statistics.median(r["ttft_p50_ms"] for r in rows[name])
        summary.append({"layout": name, "replicas": replicas, "n_threads": threads,
                        "clients": clients, "aggregate_tok_s": round(median, 1),
                        "ratio": round(median / base, 2), "ttft_p50_ms": round(ttft, 1)})
        print(f"  {name:>36} ({clients:2} clients): {median:7.1f} tok/s  x{median / base:4.2f}"
              f"  TTFT p50 {ttft:7.1f} ms")
    report = {
        "benchmark": "replicas",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_s": round(time.monotonic() - started, 1),
        "clients": args.clients, "requests_per_client": 4, "max_tokens": args.max_tokens,
        "summary": summary,
        "runs": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
