"""Shared fixtures: the real default model, configs on temporary data dirs, real servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from lollms_fast.config import DEFAULT_MODEL_FILE, Config, load_config
from lollms_fast.modelfiles import ensure_default_model

REPO = Path(__file__).resolve().parent.parent
# the assembled default model is kept between runs (it is 250 MB; assembling takes seconds)
MODEL_CACHE = Path(os.environ.get("LOLLMS_FAST_TEST_MODEL_DIR", REPO / ".cache" / "models"))

# no per-example time limit: a deadline is a timing threshold, and on two shared cores a
# slow example says nothing about the code (benchmarks judge speed)
settings.register_profile("lollms_fast", deadline=None)
settings.load_profile("lollms_fast")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real default model (Gemma 3 270M Q4_K_M), assembled from its PyPI package."""
    return ensure_default_model(MODEL_CACHE)


@pytest.fixture
def make_config(tmp_path: Path, default_model_path: Path) -> Callable[..., Config]:
    """Config on a fresh data dir, using the real default model, no environment leaking in."""

    def make(**overrides: Any) -> Config:
        flags: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "model": str(default_model_path),
            "host": "127.0.0.1",
            "port": 0,
            "n_threads": 2,
            "parallel": 4,
            "ctx_size": 1024,
        }
        flags.update(overrides)
        return load_config(flags, environ={})

    return make


@pytest.fixture
def model_name() -> str:
    return DEFAULT_MODEL_FILE


# ---------------------------------------------------------------- lollms REST servers

REST_BODY_LIMIT = 64 * 1024


@pytest.fixture
async def rest_client(aiohttp_client: Any, make_config: Callable[..., Config]) -> Any:
    """A real server on an ephemeral port with a real SQLite file, no model (REST tests)."""
    from lollms_fast.app import build_app

    config = make_config(max_body_size=REST_BODY_LIMIT)
    return await aiohttp_client(build_app(config, backend_factory=None))


@pytest.fixture
async def other_client(aiohttp_client: Any, rest_client: Any) -> Any:
    """A second client (its own cookie jar) of the same server."""
    return await aiohttp_client(rest_client.server)


# ---------------------------------------------------------------- PostgreSQL and Redis


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One throwaway PostgreSQL cluster for the session (tests/servicekit.py)."""
    from servicekit import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: Any) -> str:
    """A fresh, empty database on the session's PostgreSQL server (its URL)."""
    return str(postgres_server.create_database())


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """One redis-server for the session, no persistence (tests/servicekit.py)."""
    from servicekit import RedisServer

    with RedisServer() as server:
        yield server


# ---------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="session")
def chromium_binaries() -> tuple[str, str]:
    from browserkit import find_chromium

    return find_chromium()


@pytest.fixture
def browser(chromium_binaries: tuple[str, str]) -> Any:
    """A headless Chromium (selenium WebDriver), quit after the test."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_binaries
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
