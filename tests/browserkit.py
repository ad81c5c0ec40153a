"""Helpers for the headless-Chromium tests: finding Chromium and chromedriver, a real
`lollms-fast serve` child process (chatkit.server_process), waiting on the page, small JSON
calls to the server.
The `chromium_binaries` and `browser` fixtures built on these live in conftest.py.

Chromium comes from Debian's packages: `find_chromium` installs `chromium` and
`chromium-driver` with apt-get (servicekit.need_tool) when they are missing and the tests
run as root (CI); elsewhere install them once by hand (`sudo apt-get install chromium
chromium-driver`).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatkit import server_process
from servicekit import need_tool

APT_PACKAGES = ["chromium", "chromium-driver"]


def _find_binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def find_chromium() -> tuple[str, str]:
    """(chromium, chromedriver); skips the test (fails it under CI) when there are none."""
    return need_tool(_find_binaries, APT_PACKAGES)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


@contextmanager
def serve(data: Path, model: Path, *args: str) -> Iterator[str]:
    """`lollms-fast serve` (chatkit.server_process) with the UI tests' small settings;
    yields its base URL once the model is loaded. `data` holds its local_config.yaml."""
    with server_process(data, model, "--n-threads", "2", "--parallel", "2",
                        "--ctx-size", "1024", *args) as base:
        yield base


def wait_for(predicate: Callable[[], Any], timeout: float = 60, what: str = "condition"
             ) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # the DOM changes under us while it re-renders
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
