"""The soak (benchmarks/soak.py) for 30 seconds: 8 answers streaming and 50 REST clients
against a server process, then the database checked against what the clients did. Only
the must-be-zero figures are asserted; RSS, stalls and latencies are reported (printed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@pytest.mark.slow
def test_soak_30_seconds_has_no_errors_and_loses_nothing(tmp_path: Path,
                                                        default_model_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(SOAK), "--minutes", "0.5", "--json", str(out),
                          "--model", str(default_model_path)],
                         capture_output=True, text=True, timeout=280)
    print(run.stdout)
    assert out.exists(), run.stdout + run.stderr
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["errors"] == 0, figures["error_samples"]
    assert figures["lost_rows"] == 0 and figures["duplicated_rows"] == 0
    assert figures["changed_rows"] == 0 and figures["resurrected_rows"] == 0
    assert figures["integrity"] == "ok"
    assert figures["rest_requests"] > 0 and figures["probe_requests"] > 0
    assert run.returncode == 0, run.stdout + run.stderr
