"""benchmarks/plot.py reads what benchmarks/run.py writes: the committed results file must
still give the README's table and plot (catches the two drifting apart; no model needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_plot() -> ModuleType:
    pytest.importorskip("matplotlib")  # the [bench] extra
    spec = importlib.util.spec_from_file_location("bench_plot", BENCH / "plot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_give_the_readme_table_and_plot(tmp_path: Path) -> None:
    plot = load_plot()
    doc = json.loads((BENCH / "results.json").read_text())
    table = plot.markdown(doc)
    assert "single stream, Socket.IO vs raw greedy loop" in table
    assert "–" not in table  # every row the table names exists in the results
    out = tmp_path / "plot.png"
    plot.plot(doc, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size < 200_000
