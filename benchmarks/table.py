"""Medians, min, max and ratios of interleaved benchmark rounds; the printed table and JSON."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    reference: str | None = None  # the row this one's ratio is computed against
    higher_is_better: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


class Table:
    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: dict[str, Row] = {}
        self.checks: dict[str, Any] = {}

    def row(self, name: str, unit: str, reference: str | None = None,
            higher_is_better: bool = True) -> Row:
        if name not in self.rows:
            self.rows[name] = Row(name, unit, reference=reference,
                                  higher_is_better=higher_is_better)
        return self.rows[name]

    def ratio(self, row: Row) -> float | None:
        """How many times better than the reference (>1 is better, whichever the unit)."""
        if row.reference is None:
            return None
        ref = self.rows[row.reference].median
        return row.median / ref if row.higher_is_better else ref / row.median

    def print(self) -> None:
        print(f"\n{self.title}")
        print(f"{'contender':<34} {'median':>10} {'min':>10} {'max':>10} {'unit':<8} ratio")
        for r in self.rows.values():
            ratio = self.ratio(r)
            vs = f"{ratio:.3f}x vs {r.reference}" if ratio is not None else ""
            print(f"{r.name:<34} {r.median:>10.2f} {min(r.samples):>10.2f} "
                  f"{max(r.samples):>10.2f} {r.unit:<8} {vs}")
        for k, v in self.checks.items():
            print(f"check: {k}: {v}")

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "checks": self.checks, "rows": [
            {"name": r.name, "unit": r.unit, "median": r.median, "min": min(r.samples),
             "max": max(r.samples), "samples": r.samples, "reference": r.reference,
             "ratio": self.ratio(r)} for r in self.rows.values()]}


def write_json(path: str | None, tables: list[Table], settings: dict[str, Any]) -> None:
    if not path:
        return
    import llama_cpp
    doc = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "processor": platform.processor()},
           "llama_cpp_python": llama_cpp.__version__, "settings": settings,
           "tables": [t.as_json() for t in tables]}
    Path(path).write_text(json.dumps(doc, indent=2))
