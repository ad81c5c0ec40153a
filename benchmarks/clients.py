"""The streaming clients moved into the package (`lollms_fast.bench.clients`, also behind
`lollms-fast bench`); this name stays for the benchmarks that still import it from here
(soak.py, bench_rest.py)."""

from __future__ import annotations

from lollms_fast.bench.clients import LollmsClient, Stream, completion_stream

__all__ = ["LollmsClient", "Stream", "completion_stream"]
