"""Issue 11 in a real browser: a 2023-style page served from `--ui-dir` opens its Socket.IO
connection as it loads, before any HTTP call, then creates a discussion over HTTP and
prompts on the socket. Every `message` and `final` must name the discussion the page
created, and the answer must be saved in it. Real default model, short greedy answers.

The page (tests/pages/socket_first/) runs one of two clients: `polling` connects like
socket.io-client (handshake and CONNECT over long-polling, then an upgrade to WebSocket),
`sio` is the built-in UI's WebSocket-only client (src/lollms_fast/ui/sio.js).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browserkit import post_json, serve, wait_for

pytest.importorskip("selenium.webdriver")

pytestmark = pytest.mark.slow

PAGE = Path(__file__).resolve().parent / "pages" / "socket_first"
BUILTIN_SIO = Path(__file__).resolve().parent.parent / "src" / "lollms_fast" / "ui" / "sio.js"


@pytest.fixture
def page_server(tmp_path: Path, default_model_path: Path) -> Iterator[str]:
    ui = tmp_path / "ui"
    shutil.copytree(PAGE, ui)
    shutil.copy(BUILTIN_SIO, ui / "sio.js")  # with ui_dir set, only ui_dir is served
    data = tmp_path / "data"
    data.mkdir()
    (data / "local_config.yaml").write_text(
        "override_personality_model_parameters: true\ntemperature: 0.0\nn_predict: 24\n")
    with serve(data, default_model_path, "--ui-dir", str(ui)) as base:
        yield base


def finished_record(browser: Any) -> dict[str, Any] | None:
    """What the page saw, once it has its `final` event or an error; None before."""
    record: dict[str, Any] = browser.execute_script("return window.record")
    if record["errors"] or any(name == "final" for name, _ in record["events"]):
        return record
    return None


@pytest.mark.parametrize("client", ["polling", "sio"])
def test_a_page_that_connects_its_socket_first_gets_its_answer(
        page_server: str, browser: Any, client: str) -> None:
    browser.get(f"{page_server}/?client={client}")
    record = wait_for(lambda: finished_record(browser), 120, "the answer's final event")
    assert record["errors"] == []
    assert record["client"] == client
    created = record["discussionId"]
    assert isinstance(created, int)
    streamed = [(name, data) for name, data in record["events"]
                if name in ("message", "final")]
    assert any(name == "message" for name, _ in streamed)
    named = {data["discussion_id"] for _, data in streamed}
    assert named == {created}, f"events name {named}, the page created {created}"
    final = streamed[-1][1]
    assert final["finish_reason"] in ("stop", "length") and final["data"].strip()
    rows = post_json(page_server + "/load_discussion", {"id": created})
    saved = {row["id"]: row for row in rows}
    assert saved[final["ai_message_id"]]["content"] == final["data"]
    assert saved[final["ai_message_id"]]["sender"] != "user"
