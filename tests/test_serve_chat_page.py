"""The chat page at / (plainlm/serve/static/chat.html) in a real headless browser against a real server.

Debian's chromium, driven by selenium through chromium-driver, opens the page served by a `plainlm serve`
subprocess (a tiny model and one LoRA adapter, so the model picker has two entries, and an API key), and
does what a user does: enters the key, types a message, watches the answer stream in, switches to the
adapter and asks again. What the page shows is checked against what the server answers through its API.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
from helpers import plainlm_serve

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
API_KEY = "page-test-key"
BASE, ADAPTER = "tiny", "shout"
MAX_TOKENS = 12


def api(base_url: str, path: str, body: dict | None = None) -> dict:
    """One call to the server's API with the test's key, as the openai client would make it."""
    request = urllib.request.Request(
        base_url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def greedy_answer(base_url: str, model: str, messages: list[dict]) -> str:
    """The answer the API gives with the page's settings in these tests (greedy, MAX_TOKENS), not streamed."""
    body = {"model": model, "messages": messages, "temperature": 0, "top_p": 0.95, "max_tokens": MAX_TOKENS}
    return api(base_url, "/v1/chat/completions", body)["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def server(tiny_hf_dir: Path, tiny_adapter_dir: Path) -> Iterator[str]:
    options = ["--served_model_name", BASE, "--lora", f"{ADAPTER}={tiny_adapter_dir}", "--api_key", API_KEY]
    with plainlm_serve(tiny_hf_dir, *options) as running:
        yield running.url


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: chromium's sandbox refuses to run as root, which is how tests run in CI here.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


# Records every text the newest answer showed, in order, so the test can tell a streamed answer (growing
# piece by piece) from one that appeared whole. The page sets the answer's textContent once per piece,
# which adds a new text node each time: MutationObserver keeps each as a record (with that node, holding
# the text of that moment) even when several pieces land between two of its callbacks.
WATCH_ANSWER = """
window.shownTexts = [];
if (!window.answerWatcher) {
  window.answerWatcher = new MutationObserver((records) => {
    for (const record of records)
      if (record.target.matches('.message.assistant .text'))
        for (const node of record.addedNodes) window.shownTexts.push(node.textContent);
  });
  window.answerWatcher.observe(document.getElementById('conversation'), {childList: true, subtree: true});
}
"""


def ask(driver: webdriver.Chrome, text: str) -> tuple[str, str, list[str]]:
    """Type `text`, press Send, wait for the answer to finish; returns its text, its meta line and the
    texts it showed while streaming."""
    driver.execute_script(WATCH_ANSWER)
    answers_before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > answers_before)
    answer = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    wait.until(lambda d: answer.find_element(By.CLASS_NAME, "meta").text)  # written when the stream ends
    assert not driver.find_element(By.ID, "error").text
    shown = driver.execute_script("return window.shownTexts")
    text = answer.find_element(By.CLASS_NAME, "text").get_attribute("textContent")
    return text, answer.find_element(By.CLASS_NAME, "meta").text, shown


def set_field(driver: webdriver.Chrome, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_chat_page_streams_keeps_the_conversation_and_switches_to_an_adapter(
    browser: webdriver.Chrome, server: str
) -> None:
    browser.get(server + "/")
    wait = WebDriverWait(browser, 20)

    # The server wants a key: the page says so, and loads the models once it is entered.
    wait.until(lambda d: "401" in d.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "settings").get_attribute("open") is not None, "the key's field is hidden"
    set_field(browser, "api-key", API_KEY)
    set_field(browser, "temperature", "0")
    set_field(browser, "max-tokens", str(MAX_TOKENS))
    browser.find_element(By.ID, "prompt").click()  # leaving the key field fires its change event
    picker = Select(browser.find_element(By.ID, "model"))
    wait.until(lambda d: len(picker.options) == 2)
    assert [option.get_attribute("value") for option in picker.options] == [BASE, ADAPTER]
    assert picker.first_selected_option.get_attribute("value") == BASE
    assert browser.execute_script("return localStorage.getItem('plainlm.apiKey')") == API_KEY

    first, meta, shown = ask(browser, "Hello there")
    assert first, "the base model's answer is empty"
    assert meta.startswith(BASE + " ·") and "tokens/s" in meta, meta
    assert len(set(shown)) > 1, f"the answer appeared whole, not streamed: {shown}"
    assert all(later.startswith(earlier) for earlier, later in pairwise(shown)), shown
    assert shown[-1] == first

    # The pieces, joined, are the whole answer: the API's greedy one, not streamed, for the same message.
    hello = [{"role": "user", "content": "Hello there"}]
    assert first == greedy_answer(server, BASE, hello)

    picker.select_by_value(ADAPTER)
    second, meta, _ = ask(browser, "And again")
    assert meta.startswith(ADAPTER + " ·") and "tokens/s" in meta, meta

    # The page resent the whole conversation to the adapter: the API, asked the same, answers the same.
    conversation = [*hello, {"role": "assistant", "content": first}, {"role": "user", "content": "And again"}]
    assert second == greedy_answer(server, ADAPTER, conversation)
    assert second != greedy_answer(server, BASE, conversation), "the adapter answered as the base does"


def test_chat_page_shows_a_server_error_and_gives_the_message_back(browser: webdriver.Chrome, server: str) -> None:
    browser.get(server + "/")
    # A key the page remembered (localStorage) is used from the start: no key to type after a reload.
    browser.execute_script(f"localStorage.setItem('plainlm.apiKey', '{API_KEY}')")
    browser.refresh()
    picker = Select(browser.find_element(By.ID, "model"))
    WebDriverWait(browser, 20).until(lambda d: len(picker.options) == 2)
    browser.find_element(By.TAG_NAME, "summary").click()
    set_field(browser, "temperature", "-1")
    browser.find_element(By.ID, "prompt").send_keys("Too cold")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "error").text)
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("400: ") and "temperature" in error, error
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "Too cold"
    assert not browser.find_elements(By.CSS_SELECTOR, ".message")
