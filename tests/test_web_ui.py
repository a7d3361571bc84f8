"""The built-in chat page (GET /) in a real headless Chromium, driven by Selenium, against a
real in-process server (tests/live_server.py) over the tiny random-weight model.

What a person would see: the page loads with no console errors; a message streams its answer
into the view a piece at a time; Stop aborts mid-stream and the server frees every KV block; a
model answer carrying `<script>` (injected by patching the stream's Job, as a random model
will not write one) is shown as text and never runs; with --api-key the page asks for the key,
fails visibly but cleanly without it and works with it; `--no-web-ui` answers / with a 404.
A screenshot of a conversation goes to $GATEWAY_SCREENSHOT (default /tmp/gateway-web-ui.png).

Debian's chromium and chromium-driver are installed on first use by scripts/get_chromium.sh
(apt-get, as root); the tests skip, with the script's reason, only where that cannot be done."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from live_server import LiveServer

GET_CHROMIUM = Path(__file__).resolve().parents[1] / "scripts/get_chromium.sh"
pytestmark = pytest.mark.slow
STEP_DELAY_S = 0.03     # per engine step: a long answer takes seconds, so it can be watched and stopped
WAIT_S = 120            # generous: a loaded 2-core box starts Chromium and the engine slowly
API_KEY = "sk-web-ui-test"
SCREENSHOT = Path(os.environ.get("GATEWAY_SCREENSHOT", "/tmp/gateway-web-ui.png"))
PAYLOAD = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> and **bold**'


def slowed(live: LiveServer) -> LiveServer:
    step = live.gate._step

    def slow_step():
        time.sleep(STEP_DELAY_S)
        return step()
    live.gate._step = slow_step
    return live


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=512) as server:
        yield slowed(server)


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installing them first where they are missing."""
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return shutil.which("chromium"), shutil.which("chromedriver")
    done = subprocess.run(["bash", str(GET_CHROMIUM)], capture_output=True, text=True, timeout=900)
    if done.returncode == 2:
        pytest.skip(f"no headless browser: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    browser, driver = done.stdout.split()[-2:]
    return browser, driver


@pytest.fixture
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,850"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


# ---------------------------------------------------------------- page helpers

def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def wait_until(driver, predicate, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d), what)


def open_page(driver, url: str, settings: dict | None = None, models: bool = True) -> None:
    driver.get(url + "/")
    if settings is not None:   # what the Settings dialog would have stored, then a reload
        js(driver, "localStorage.setItem('gateway.chat.settings', arguments[0])", json.dumps(settings))
        driver.refresh()
    wait_until(driver, lambda d: js(d, "return document.body.dataset.state") == "idle", "page ready")
    if models:
        wait_until(driver, lambda d: js(d, "return document.getElementById('model').options.length") > 0,
                   "models listed")


def send(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()


def last_reply(driver) -> dict:
    return js(driver, """const r = [...document.querySelectorAll('#log .msg.assistant')].pop();
        return r ? {status: r.dataset.status, text: r.querySelector('.body').textContent,
                    note: r.querySelector('.status').textContent} : null;""")


def watch_reply(driver) -> list[int]:
    """The last answer's text length, sampled in the page every 20 ms until it stops streaming."""
    return driver.execute_async_script("""const done = arguments[arguments.length - 1], seen = [];
        const tick = () => {
          const r = [...document.querySelectorAll('#log .msg.assistant')].pop();
          if (r) seen.push(r.querySelector('.body').textContent.length);
          if (r && r.dataset.status !== 'streaming') done(seen); else setTimeout(tick, 20);
        };
        tick();""")


def severe_logs(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]


def dialog_open(driver, name: str) -> bool:
    return js(driver, "return document.getElementById(arguments[0]).open", name)


# ---------------------------------------------------------------- tests

def test_page_loads_clean_and_streams_answers(live, browser):
    from selenium.webdriver.common.by import By
    open_page(browser, live.url, {"max_tokens": 48, "temperature": 0.7})
    assert severe_logs(browser) == []
    send(browser, "Hello there, who are you?")
    lengths = watch_reply(browser)
    reply = last_reply(browser)
    assert reply["status"] == "done", reply
    growth = sorted(set(n for n in lengths if n > 0))
    assert len(growth) >= 3, f"the answer did not grow piece by piece: {lengths}"
    assert growth[-1] == len(reply["text"]) > 0
    stats = js(browser, "return document.getElementById('stats').textContent")
    assert "TTFT" in stats and "tok/s" in stats and "48 tokens" in stats, stats

    send(browser, "And a second turn, please.")   # the session path (or the full history)
    watch_reply(browser)
    assert last_reply(browser)["status"] == "done"
    assert js(browser, "return document.querySelectorAll('#log .turn').length") == 2
    assert severe_logs(browser) == []
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    print(f"screenshot of a conversation: {SCREENSHOT}")
    browser.find_element(By.ID, "clear").click()   # deletes the server session and its pinned KV
    assert live.blocks_in_use(settle_s=30) == 0


@pytest.mark.parametrize("session", [False, True], ids=["history", "session"])
def test_stop_aborts_mid_stream_and_frees_the_kv(live, browser, session):
    from selenium.webdriver.common.by import By
    assert live.blocks_in_use(settle_s=30) == 0   # nothing left over from an earlier test
    open_page(browser, live.url, {"max_tokens": 400, "session": session})
    send(browser, "Tell me a very long story.")
    wait_until(browser, lambda d: len((last_reply(d) or {}).get("text", "")) > 0, "first tokens")
    assert live.blocks_in_use(settle_s=0) > 0   # mid-stream: the answer holds KV blocks
    browser.find_element(By.ID, "stop").click()
    wait_until(browser, lambda d: last_reply(d)["status"] != "streaming", "stream ended")
    reply = last_reply(browser)
    assert reply["status"] == "stopped" and "stopped" in reply["note"], reply
    assert len(reply["text"]) > 0
    if not session:
        assert live.blocks_in_use(settle_s=30) == 0
    browser.find_element(By.ID, "clear").click()   # a session's pinned prompt goes with it
    assert live.blocks_in_use(settle_s=30) == 0
    assert severe_logs(browser) == []


def test_script_in_an_answer_is_text(live, browser, monkeypatch):
    from gateway.api import streaming

    deliver, seen = streaming.Job.deliver, set()

    def inject(job, out):   # the first piece of each answer becomes the payload, the rest nothing
        first = out.request_id not in seen
        seen.add(out.request_id)
        deliver(job, dataclasses.replace(out, new_text=PAYLOAD if first else ""))
    monkeypatch.setattr(streaming.Job, "deliver", inject)

    open_page(browser, live.url, {"max_tokens": 6})
    send(browser, "Say something dangerous.")
    watch_reply(browser)
    reply = last_reply(browser)
    assert reply["status"] == "done", reply
    assert "<script>window.__pwned=1</script>" in reply["text"]
    assert '<img src=x onerror="window.__pwned=2">' in reply["text"]
    assert js(browser, "return document.querySelectorAll('#log script, #log img').length") == 0
    assert js(browser, "return document.querySelector('#log .msg.assistant strong').textContent") == "bold"
    time.sleep(0.5)   # an onerror would fire at once; give it a moment to have fired
    assert js(browser, "return typeof window.__pwned") == "undefined"
    assert severe_logs(browser) == []


def test_api_key_asked_for_and_missing_key_fails_cleanly(tiny_llama_dir, browser):
    from selenium.webdriver.common.by import By
    unauthorized = ("401",)   # the browser logs each refused fetch; those are expected here
    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256,
                    api_keys=[API_KEY]) as keyed:
        open_page(browser, keyed.url, {"max_tokens": 8}, models=False)
        wait_until(browser, lambda d: dialog_open(d, "key-dialog"), "the key dialog")
        assert "needs an API key" in browser.find_element(By.ID, "key-reason").text
        browser.find_element(By.ID, "key-cancel").click()

        send(browser, "Hello without a key")   # refused: a visible error, the page still works
        wait_until(browser, lambda d: (last_reply(d) or {}).get("status") == "error", "a refused answer")
        assert "401" in last_reply(browser)["note"]
        assert dialog_open(browser, "key-dialog")
        assert severe_logs(browser, unauthorized) == []

        browser.find_element(By.ID, "key-input").send_keys("sk-wrong")
        browser.find_element(By.ID, "key-save").click()   # the page tries it on /v1/models at once
        wait_until(browser, lambda d: dialog_open(d, "key-dialog")
                   and "rejected" in d.find_element(By.ID, "key-reason").text, "the key refused")

        browser.find_element(By.ID, "key-input").send_keys(API_KEY)
        browser.find_element(By.ID, "key-save").click()
        wait_until(browser, lambda d: js(d, "return document.getElementById('model').options.length") > 0,
                   "models listed with the key")
        send(browser, "Hello with the key")
        watch_reply(browser)
        assert last_reply(browser)["status"] == "done"
        assert js(browser, "return document.querySelectorAll('#log .turn').length") == 2
        assert severe_logs(browser, unauthorized) == []


def test_no_web_ui_answers_404(tiny_llama_dir, live):
    page = httpx.get(live.url + "/", timeout=30)
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=32, block_size=16, max_model_len=128,
                    web_ui=False) as bare:
        assert httpx.get(bare.url + "/", timeout=30).status_code == 404
        assert httpx.get(bare.url + "/ui/chat.js", timeout=30).status_code == 404
