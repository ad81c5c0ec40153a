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


def test_the_soak_check_finds_lost_duplicated_and_changed_rows(tmp_path: Path) -> None:
    """The ledger comparison is not vacuous: each kind of damage is counted."""
    import importlib.util
    import sqlite3

    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = soak  # its dataclasses look their module up while being made
    try:
        spec.loader.exec_module(soak)
    finally:
        del sys.modules["soak"]

    db = tmp_path / "database.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE discussion (id INTEGER PRIMARY KEY, title TEXT, created_at TEXT);
        CREATE TABLE message (id INTEGER PRIMARY KEY, sender TEXT, content TEXT, type INT,
                              rank INT, parent INT, created_at TEXT, discussion_id INT);
        INSERT INTO discussion (id, title) VALUES (1, 'kept'), (2, 'renamed behind our back');
        INSERT INTO message VALUES (10, 'user', 'hello', 0, 0, 0, NULL, 1),
                                   (11, 'lollms', 'changed', 0, 0, 10, NULL, 1),
                                   (12, 'user', 'came back', 0, 0, 11, NULL, 1);
    """)
    conn.commit()
    conn.close()
    ledger = soak.Ledger()
    ledger.add_discussion(1, "kept", [
        {"id": 10, "sender": "user", "content": "hello", "type": 0, "rank": 0, "parent": 0},
        {"id": 11, "sender": "lollms", "content": "as saved", "type": 0, "rank": 0,
         "parent": 10},
        {"id": 13, "sender": "user", "content": "lost", "type": 0, "rank": 0, "parent": 11}])
    ledger.add_discussion(2, "the title", [])
    ledger.deleted_messages.add(12)
    found = soak.check_database(db, ledger)
    assert found["integrity"] == "ok"
    assert (found["lost"], found["duplicated"], found["resurrected"], found["changed"]) == (
        1, 1, 1, 2)
    assert soak.must_be_zero({"errors": 0, "lost_rows": 1, "duplicated_rows": 0,
                              "changed_rows": 0, "resurrected_rows": 0,
                              "integrity": "ok"}) == ["lost_rows"]
