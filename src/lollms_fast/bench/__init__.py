"""`lollms-fast bench`: a load generator for any running LLM server.

Streams M requests through N concurrent clients, over the lollms Socket.IO protocol or the
OpenAI API, and reports time to first token, tokens/s (per stream and aggregate), gaps between
pieces and errors (`report.py` defines each figure). The clients (`clients.py`) are also what
benchmarks/run.py drives its contenders with.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson

from .clients import (
    LollmsClient,
    SSEEvent,
    SSEParser,
    Stream,
    completion_stream,
    openai_body,
    openai_stream,
)
from .report import Progress, Result, percentile, summarize, table
from .runner import DEFAULT_PROMPT, BenchError, BenchOptions, load_prompts, run

__all__ = [
    "DEFAULT_PROMPT", "BenchError", "BenchOptions", "LollmsClient", "Progress", "Result",
    "SSEEvent", "SSEParser", "Stream", "completion_stream", "load_prompts", "main",
    "openai_body", "openai_stream", "percentile", "run", "summarize", "table",
]


def main(opts: BenchOptions, json_path: Path | None = None) -> int:
    """Run, print the table, write the JSON. Exit status: 0 when every request succeeded,
    1 when some failed, 2 when the run could not start."""
    try:
        report = asyncio.run(run(opts))
    except BenchError as exc:
        print(f"lollms-fast bench: error: {exc}", file=sys.stderr)
        return 2
    print(table(report), flush=True)
    if json_path is not None:
        try:
            json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        except OSError as exc:
            print(f"lollms-fast bench: error: cannot write {json_path}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0 if report["errors"]["count"] == 0 else 1
