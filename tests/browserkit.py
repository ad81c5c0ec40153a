"""Helpers for the headless-Chromium tests: finding Chromium and chromedriver, a real
`lollms-fast serve` child process, waiting on the page, small JSON calls to the server.
The `chromium_binaries` and `browser` fixtures built on these live in conftest.py.

Chromium comes from Debian's packages: `find_chromium` installs `chromium` and
`chromium-driver` with apt-get when they are missing and the tests run as root (CI);
elsewhere install them once by hand (`sudo apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from chatkit import free_port

APT_PACKAGES = ["chromium", "chromium-driver"]


def _find_binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _apt_install() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def find_chromium() -> tuple[str, str]:
    """(chromium, chromedriver); skips the test (fails it under CI) when there are none."""
    found = _find_binaries()
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        _apt_install()
        found = _find_binaries()
    if found is None:
        message = "headless Chromium is needed: sudo apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


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
    """`lollms-fast serve` on a free loopback port in a child process, until the block
    ends; yields its base URL once it answers. `data` holds its local_config.yaml."""
    port = free_port()
    cmd = [sys.executable, "-m", "lollms_fast", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(data), "--model", str(model),
           "--n-threads", "2", "--parallel", "2", "--ctx-size", "1024", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(base + "/get_config")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    stderr = proc.stderr.read() if proc.stderr else ""
                    raise RuntimeError("server did not start: " + stderr) from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


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
