"""What a bench run measured: the statistics, the table on stdout, the JSON, the progress bar.

Definitions (all from the client's side, perf_counter clock):
- TTFT: request sent -> first non-empty piece;
- per-stream tokens/s: (tokens - 1) / (last piece - first piece), for each answer with at
  least two pieces; the report gives its median;
- aggregate tokens/s: all tokens of the answers that succeeded / wall time of the whole run
  (first request sent -> last answer ended);
- gaps: time between consecutive pieces of one answer, pooled over all answers;
- percentiles: nearest rank (the smallest value with at least q of the values at or below).
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .clients import Stream

MAX_ERROR_MESSAGES = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 1]; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Result:
    """One request of the run: its answer and whether it counts as done."""

    index: int
    prompt_index: int
    stream: Stream
    tokens: int = 0
    tokens_exact: bool = False  # from the server's own count (usage), not from pieces

    @property
    def ok(self) -> bool:
        return not self.stream.error


def count_tokens(s: Stream) -> tuple[int, bool]:
    """Tokens of one answer: the server's `usage.completion_tokens` when it sent one, else
    the pieces received (each streamed piece carries at least one token, so a lower bound)."""
    if s.usage_tokens is not None:
        return s.usage_tokens, True
    return s.pieces, False


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def summarize(results: Sequence[Result], wall_s: float, config: dict[str, Any]
              ) -> dict[str, Any]:
    """The JSON report of a run (see docs: `lollms-fast bench --json`)."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.tokens for r in done)
    exact = [r.tokens_exact for r in done]
    counting = ("none" if not exact else "usage" if all(exact) else "pieces"
                if not any(exact) else "mixed")
    rates = []
    for r in done:
        s = r.stream
        if r.tokens > 1 and s.pieces > 1 and s.piece_times[-1] > s.t_first:
            rates.append((r.tokens - 1) / (s.piece_times[-1] - s.t_first))
    ttfts = [r.stream.ttft for r in done if r.stream.pieces]
    gaps = [g for r in done for g in r.stream.gaps()]
    messages: list[str] = []
    for r in failed:
        if r.stream.error not in messages and len(messages) < MAX_ERROR_MESSAGES:
            messages.append(r.stream.error)
    notes = []
    if counting in ("pieces", "mixed"):
        notes.append("tokens estimated from pieces: the server sent no token count, and a "
                     "piece may carry more than one token (a lower bound)")
    return {
        "config": config,
        "requests": len(results),
        "done": len(done),
        "errors": {"count": len(failed), "first": messages},
        "tokens": tokens,
        "token_count": counting,
        "wall_s": round(wall_s, 4),
        "aggregate_tok_s": _round(tokens / wall_s if wall_s > 0 else None),
        "stream_tok_s": {"p50": _round(percentile(rates, 0.5))},
        "ttft_ms": {"p50": _ms(percentile(ttfts, 0.5)), "p99": _ms(percentile(ttfts, 0.99))},
        "gap_ms": {"p50": _ms(percentile(gaps, 0.5)), "p99": _ms(percentile(gaps, 0.99))},
        "finish_reasons": dict(Counter(r.stream.finish_reason or "(none)" for r in done)),
        "per_request": [{
            "index": r.index, "prompt": r.prompt_index, "ok": r.ok, "tokens": r.tokens,
            "tokens_exact": r.tokens_exact, "pieces": r.stream.pieces,
            "ttft_ms": _ms(r.stream.ttft) if r.stream.pieces else None,
            "duration_ms": _ms(r.stream.t_end - r.stream.t_send),
            "finish_reason": r.stream.finish_reason, "error": r.stream.error,
        } for r in results],
        "notes": notes,
    }


def _fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:,.1f} {unit}"


def table(report: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    c = report["config"]
    counting = {"usage": " (counted by the server: usage)",
                "pieces": " (estimated from pieces)",
                "mixed": " (usage where sent, else pieces)",
                "none": ""}[report["token_count"]]
    rows = [
        ("requests done", f"{report['done']} / {report['requests']}"),
        ("errors", str(report["errors"]["count"])),
        ("tokens", f"{report['tokens']}{counting}"),
        ("wall time", _fmt(report["wall_s"], "s")),
        ("aggregate", _fmt(report["aggregate_tok_s"], "tok/s")),
        ("per stream, p50", _fmt(report["stream_tok_s"]["p50"], "tok/s")),
        ("TTFT p50", _fmt(report["ttft_ms"]["p50"], "ms")),
        ("TTFT p99", _fmt(report["ttft_ms"]["p99"], "ms")),
        ("gap p50", _fmt(report["gap_ms"]["p50"], "ms")),
        ("gap p99", _fmt(report["gap_ms"]["p99"], "ms")),
        ("finish reasons", ", ".join(f"{k} {v}" for k, v in
                                     sorted(report["finish_reasons"].items())) or "-"),
    ]
    where = c["api"] + (f" /v1 {c['endpoint']}" if c["api"] == "openai" else "")
    lines = [f"lollms-fast bench: {c['url']} ({where}), {c['clients']} clients, "
             f"{c['requests']} requests, max {c['max_tokens']} tokens"]
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += [f"  error: {m}" for m in report["errors"]["first"]]
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr, redrawn as requests finish; silent when off or when
    stderr is not a terminal."""

    WIDTH = 30

    def __init__(self, total: int, enabled: bool = True, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.total = total
        self.enabled = enabled and self.out.isatty()
        self.started = time.perf_counter()
        self.done = self.errors = 0

    def line(self) -> str:
        n = self.done + self.errors
        filled = self.WIDTH * n // self.total if self.total else self.WIDTH
        errors = f", {self.errors} errors" if self.errors else ""
        return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {n}/{self.total} requests"
                f"{errors}  {time.perf_counter() - self.started:.1f} s")

    def update(self, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.errors += 1
        self.draw()

    def draw(self) -> None:
        if self.enabled:
            self.out.write("\r" + self.line())
            self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()
