"""The chat page in a real headless browser (Debian's chromium + chromium-driver, driven by selenium): send a
message, watch the reply stream in, keep the conversation, take a screenshot. Skips when any of these is absent."""

import json
import shutil
import time

import pytest
import torch

from gptrain.model import GPT, GPTConfig
from gptrain.tokenizer import get_tokenizer

pytest.importorskip("fastapi", reason="gptrain serve needs the serve extra (pip install 'gptrain[serve]')")
from gptrain.serve.app import BackgroundServer, create_app  # noqa: E402
from gptrain.serve.config import ServeConfig  # noqa: E402
from gptrain.serve.service import Service  # noqa: E402

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1100,720")


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=get_tokenizer(chat=True).n_vocab, n_layer=2, n_head=2, n_embd=32))
    # slow each step a little so that the reply visibly arrives over many network reads
    model.transformer.h[0].register_forward_hook(lambda *_: time.sleep(0.03))
    with BackgroundServer(create_app(Service(model, "tiny-chat", ServeConfig(max_tokens_limit=256)))) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(predicate, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


WATCH = """
window.__lengths = [];
new MutationObserver(() => {
  const a = document.querySelectorAll('.msg.assistant');
  if (a.length) window.__lengths.push(a[a.length - 1].textContent.length);
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


def api_reply(srv, body):
    import http.client
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out["choices"][0]["message"]["content"]


def test_send_message_and_see_streamed_reply(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    browser.get(served.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_for(lambda: "tiny-chat" in browser.find_element(By.ID, "model").text)
    # the page offers what the server allows: half the 128-token window by default, at most 127 new tokens
    assert browser.find_element(By.ID, "max_tokens").get_attribute("value") == "64"
    assert browser.find_element(By.ID, "max_tokens_limit").text == "(at most 127)"
    assert not browser.find_element(By.ID, "api_key").is_displayed()  # this server has no key
    for field, value in (("temperature", "0"), ("max_tokens", "16"), ("system", "You are a helpful assistant.")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    browser.execute_script(WATCH)
    box = browser.find_element(By.ID, "input")
    box.send_keys("Hello! What can you do?")
    box.send_keys(Keys.ENTER)

    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-streaming='false']"))
    user = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert [u.text for u in user] == ["Hello! What can you do?"] and len(reply) == 1
    text = browser.execute_script("return document.querySelector('.msg.assistant').textContent")
    lengths = browser.execute_script("return window.__lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths  # grew piece by piece: streamed
    # the page shows exactly what the API returns for the same request
    settings = {"temperature": 0, "max_tokens": 16}
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Hello! What can you do?"}]
    assert text == api_reply(served, {"messages": messages, **settings})
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second turn is sent with the whole conversation so far
    box.send_keys("Tell me more.")
    box.send_keys(Keys.ENTER)
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-streaming='false']")) == 2)
    history = json.loads(browser.execute_script("return localStorage.getItem('gptrain.conversation')"))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == text and history[2]["content"] == "Tell me more."
    browser.save_screenshot(str(tmp_path / "chat2.png"))

    # the conversation survives a reload; "New chat" clears it
    browser.refresh()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4)
    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []


def test_api_errors_show_in_the_page(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    browser.get(served.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready"))
    el = browser.find_element(By.ID, "max_tokens")
    el.clear()
    el.send_keys("100000", Keys.TAB)  # over the server's limit: the page caps it rather than send it
    assert el.get_attribute("value") == "127"
    el.clear()
    el.send_keys("32", Keys.TAB)
    box = browser.find_element(By.ID, "input")
    box.send_keys("word " * 150)  # the message alone is over the 128-token window: a 400 whose message shows
    box.send_keys(Keys.ENTER)
    err = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert "context window 128 tokens" in err[0].text and "takes at most 127" in err[0].text, err[0].text
    assert browser.find_element(By.ID, "send").is_enabled()
