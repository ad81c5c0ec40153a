"""The built-in web UI driven in headless Chromium (Selenium + Debian's chromedriver) against
a real `lollms-fast serve` process on the real default model.

Chromium comes from Debian's packages: the `chromium_binaries` fixture installs `chromium`
and `chromium-driver` with apt-get when they are missing and the tests run as root (CI);
elsewhere install them once by hand (`sudo apt-get install chromium chromium-driver`).
The screenshot of the chat is written to `.cache/screenshots/chat.png`.
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
from pathlib import Path
from typing import Any

import pytest
from chatkit import free_port

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / ".cache" / "screenshots"
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


@pytest.fixture(scope="session")
def chromium_binaries() -> tuple[str, str]:
    found = _find_binaries()
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        _apt_install()
        found = _find_binaries()
    if found is None:
        message = ("headless Chromium is needed: sudo apt-get install chromium chromium-driver")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _post_json(url: str, body: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def live_server(tmp_path: Path, default_model_path: Path) -> Iterator[str]:
    """`lollms-fast serve` in a child process; greedy answers of at most 160 tokens."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "local_config.yaml").write_text(
        "override_personality_model_parameters: true\ntemperature: 0.0\nn_predict: 160\n")
    port = free_port()
    cmd = [sys.executable, "-m", "lollms_fast", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(data), "--model", str(default_model_path),
           "--n-threads", "2", "--parallel", "2", "--ctx-size", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get_json(base + "/get_config")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start: " + (proc.stderr.read()
                                                                   if proc.stderr else ""))
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def browser(chromium_binaries: tuple[str, str]) -> Iterator[WebDriver]:
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


def discussions(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#discussions li")


def ai_bodies(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .msg.ai .body")


def generating(driver: WebDriver) -> bool:
    return driver.find_element(By.ID, "stop").get_attribute("hidden") is None


def idle(driver: WebDriver) -> bool:
    return driver.find_element(By.ID, "stop").get_attribute("hidden") is not None


def send(driver: WebDriver, text: str) -> None:
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def accept_dialog(driver: WebDriver, text: str | None = None) -> None:
    def dialog() -> Any:
        try:
            return driver.switch_to.alert
        except NoAlertPresentException:
            return None
    alert = wait_for(dialog, 10, "a dialog")
    if text is not None:
        alert.send_keys(text)
    alert.accept()


def test_chat_in_a_real_browser(live_server: str, browser: WebDriver) -> None:
    d = browser
    d.get(live_server + "/")
    wait_for(lambda: d.find_element(By.ID, "prompt").is_displayed(), 20, "the page")
    assert not d.find_element(By.ID, "view-settings").is_displayed()
    assert not d.find_element(By.ID, "view-help").is_displayed()

    # create a discussion
    d.find_element(By.ID, "new").click()
    wait_for(lambda: len(discussions(d)) == 1, 20, "the new discussion in the sidebar")

    # send a prompt (Enter sends; Shift+Enter would add a line) and watch it stream
    send(d, "Hello! Who are you?")
    wait_for(lambda: generating(d), 20, "the generation to start")
    seen_partial = wait_for(
        lambda: [b.text for b in d.find_elements(By.CSS_SELECTOR, ".body.streaming")
                 if b.text.strip()], 60, "streamed text")
    wait_for(lambda: idle(d), 120, "the answer to finish")
    answer = ai_bodies(d)[-1].text
    assert answer.strip()
    assert len(seen_partial[0]) <= len(answer)
    user_bodies = d.find_elements(By.CSS_SELECTOR, "#messages .msg.user .body")
    assert user_bodies[-1].text == "Hello! Who are you?"
    # the sidebar title became the first prompt
    wait_for(lambda: "Hello! Who are you?" in discussions(d)[0].text, 10, "the title")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(SCREENSHOTS / "chat.png"))

    # the answer persists after a reload
    d.refresh()
    wait_for(lambda: ai_bodies(d) and ai_bodies(d)[-1].text == answer, 20,
             "the saved answer after reload")

    # prompts and model output are shown as text, never as HTML
    send(d, "<img src=x onerror=\"document.title='pwned'\"> **bold**")
    wait_for(lambda: generating(d), 20, "the second generation")
    wait_for(lambda: idle(d), 120, "the second answer")
    assert d.find_elements(By.CSS_SELECTOR, "#messages img") == []
    assert d.title != "pwned"
    assert "<img src=x" in d.find_elements(By.CSS_SELECTOR, "#messages .msg.user .body")[-1].text

    # stop a generation: the partial answer stays, on screen and in the database
    send(d, "Write a long story about a dragon.")
    wait_for(lambda: generating(d), 20, "the third generation")
    wait_for(lambda: [b for b in d.find_elements(By.CSS_SELECTOR, ".body.streaming")
                      if b.text.strip()], 60, "streamed text")
    d.find_element(By.ID, "stop").click()
    wait_for(lambda: idle(d), 30, "the stop to land")
    stopped = ai_bodies(d)[-1].text.strip()
    assert stopped
    discussion_id = int(discussions(d)[0].get_attribute("data-id"))
    rows = _post_json(live_server + "/load_discussion", {"id": discussion_id})
    saved = rows[-1]["content"]
    assert rows[-1]["sender"] == "lollms" and saved.strip()
    assert len(saved.split()) < 150  # cut short of the 160-token limit by the stop

    # rename, then delete the discussion
    rename = discussions(d)[0].find_element(By.CSS_SELECTOR, "button[title='Rename']")
    rename.click()
    accept_dialog(d, "Renamed in Chromium")
    wait_for(lambda: "Renamed in Chromium" in discussions(d)[0].text, 10, "the new title")
    assert {"id": discussion_id, "title": "Renamed in Chromium"} in _get_json(
        live_server + "/list_discussions")
    discussions(d)[0].find_element(By.CSS_SELECTOR, "button[title='Delete']").click()
    accept_dialog(d)
    wait_for(lambda: discussions(d) == [], 10, "the discussion to disappear")
    assert _get_json(live_server + "/list_discussions") == []


def test_phone_sized_screen_and_settings(live_server: str, browser: WebDriver) -> None:
    d = browser
    d.set_window_size(390, 844)
    d.get(live_server + "/settings")
    wait_for(lambda: d.find_element(By.ID, "view-settings").is_displayed(), 20,
             "the settings page")
    # the personality and model lists are filled from the server
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "#set-personality option")) >= 1,
             20, "personalities")
    width = d.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390 + 1  # nothing forces horizontal scrolling on a phone
    temperature = d.find_element(By.CSS_SELECTOR, "#params input[name='temperature']")
    temperature.clear()
    temperature.send_keys("0.25")
    d.find_element(By.ID, "save-settings").click()
    wait_for(lambda: _get_json(live_server + "/get_config")["temperature"] == 0.25, 20,
             "the saved temperature")
    # the discussions menu opens from the ☰ button on a narrow screen
    d.find_element(By.ID, "menu").click()
    wait_for(lambda: d.find_element(By.ID, "new").is_displayed(), 5, "the sidebar")
