"""benchmarks/plot.py reads what benchmarks/run.py writes: the committed results file must
still give the README's table (read from README.md and compared row by row with what
`plot.py --markdown` prints) and its plot (catches the three drifting apart; no model
needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def load_plot() -> ModuleType:
    pytest.importorskip("matplotlib")  # the [bench] extra
    spec = importlib.util.spec_from_file_location("bench_plot", BENCH / "plot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_blocks(text: str) -> list[list[str]]:
    """The Markdown tables of `text`, each as its list of `|`-lines (whitespace-trimmed)."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("|"):
            current.append(line.strip())
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def readme_performance_tables() -> list[list[str]]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("\n## Performance")
    end = readme.find("\n## ", start + 1)
    section = readme[start:end if end >= 0 else None]
    return table_blocks(section)


def test_readme_table_is_what_the_results_give() -> None:
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        [sys.executable, str(BENCH / "plot.py"), str(BENCH / "results.json"), "--markdown"],
        capture_output=True, text=True, check=True, timeout=120)
    derived = table_blocks(out.stdout)
    assert derived, out.stdout
    readme = readme_performance_tables()
    assert readme, "README.md has no table under ## Performance"
    # every table plot.py derives is in the README, row for row, numbers included
    for table in derived:
        assert table in readme, "\n".join(
            ["README.md's performance table differs from `plot.py --markdown`:", *table])
    assert "| single stream, Socket.IO vs raw greedy loop |" in out.stdout
    assert "–" not in out.stdout  # every row the table names exists in the results


def test_results_give_the_plot(tmp_path: Path) -> None:
    plot = load_plot()
    doc = json.loads((BENCH / "results.json").read_text())
    out = tmp_path / "plot.png"
    plot.plot(doc, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size < 200_000
