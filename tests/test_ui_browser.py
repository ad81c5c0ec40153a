"""The built-in web UI driven in headless Chromium (Selenium + Debian's chromedriver) against
a real `lollms-fast serve` process on the real default model.

Chromium comes from Debian's packages (see tests/browserkit.py and the `browser` fixture in
conftest.py). The screenshot of the chat is written to `.cache/screenshots/chat.png`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browserkit import get_json, post_json, serve, wait_for

from chatkit import COUNT_PROMPT, COUNTER_SETTINGS, install_counter_personality

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / ".cache" / "screenshots"


@pytest.fixture
def live_server(tmp_path: Path, default_model_path: Path) -> Iterator[str]:
    """`lollms-fast serve` in a child process; greedy answers of at most 160 tokens."""
    data = tmp_path / "data"
    data.mkdir()
    install_counter_personality(data)  # chosen for the stop step of the chat test
    (data / "local_config.yaml").write_text(
        "override_personality_model_parameters: true\ntemperature: 0.0\nn_predict: 160\n")
    with serve(data, default_model_path) as base:
        yield base


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


# Records the `final` events the page receives (Socket.IO EVENT frames over the WebSocket),
# so the test sees each answer's finish_reason, which the UI does not display.
RECORD_FINALS = """
window.__finals = [];
const NativeWebSocket = window.WebSocket;
window.WebSocket = class extends NativeWebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (e) => {
      if (typeof e.data === "string" && e.data.startsWith('42["final",')) {
        window.__finals.push(JSON.parse(e.data.slice(2))[1]);
      }
    });
  }
};
"""


def test_chat_in_a_real_browser(live_server: str, browser: WebDriver) -> None:
    d = browser
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_FINALS})
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

    # stop a generation: the partial answer stays, on screen and in the database. The
    # counting personality cannot end by itself before n_predict (900 tokens), so only the
    # stop can make this answer end `cancelled`
    for name, value in [*COUNTER_SETTINGS.items(), ("n_predict", 900)]:
        reply = post_json(live_server + "/update_setting",
                          {"setting_name": name, "setting_value": value})
        assert reply["status"] is True, reply
    finals_before = len(d.execute_script("return window.__finals"))
    send(d, COUNT_PROMPT)
    wait_for(lambda: generating(d), 20, "the third generation")
    wait_for(lambda: [b for b in d.find_elements(By.CSS_SELECTOR, ".body.streaming")
                      if b.text.strip()], 60, "streamed text")
    d.find_element(By.ID, "stop").click()
    wait_for(lambda: idle(d), 30, "the stop to land")
    stopped = ai_bodies(d)[-1].text.strip()
    assert stopped
    discussion_id = int(discussions(d)[0].get_attribute("data-id"))
    rows = post_json(live_server + "/load_discussion", {"id": discussion_id})
    saved = rows[-1]["content"]
    assert rows[-1]["sender"] == "counter" and saved.strip()
    finals = d.execute_script("return window.__finals")
    assert len(finals) == finals_before + 1, finals
    assert finals[-1]["finish_reason"] == "cancelled", finals[-1]
    assert finals[-1]["data"] == saved and finals[-1]["ai_message_id"] == rows[-1]["id"]
    assert stopped == saved.strip()

    # rename, then delete the discussion
    rename = discussions(d)[0].find_element(By.CSS_SELECTOR, "button[title='Rename']")
    rename.click()
    accept_dialog(d, "Renamed in Chromium")
    wait_for(lambda: "Renamed in Chromium" in discussions(d)[0].text, 10, "the new title")
    assert {"id": discussion_id, "title": "Renamed in Chromium"} in get_json(
        live_server + "/list_discussions")
    discussions(d)[0].find_element(By.CSS_SELECTOR, "button[title='Delete']").click()
    accept_dialog(d)
    wait_for(lambda: discussions(d) == [], 10, "the discussion to disappear")
    assert get_json(live_server + "/list_discussions") == []


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
    wait_for(lambda: get_json(live_server + "/get_config")["temperature"] == 0.25, 20,
             "the saved temperature")
    # the discussions menu opens from the ☰ button on a narrow screen
    d.find_element(By.ID, "menu").click()
    wait_for(lambda: d.find_element(By.ID, "new").is_displayed(), 5, "the sidebar")
