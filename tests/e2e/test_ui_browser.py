"""`corral ui` end to end: the real engine on the default model, driven by Debian's headless
Chromium through Playwright. Streaming, the system prompt, retry, stop and an offline page.

The screenshot lands in tests/e2e/artifacts/ui_chat.png (gitignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
BOT = '[data-testid="bot"]'


def chromium_path() -> str:
    """Debian's chromium; installed through `make browser` (apt) when missing."""
    path = shutil.which("chromium")
    if path is None:
        subprocess.run(["make", "-s", "browser"], cwd=ROOT, check=False, timeout=600)
        path = shutil.which("chromium")
    if path is None:
        pytest.fail("the UI browser test needs Debian's chromium: run `make browser` as root "
                    "or `sudo apt-get install chromium`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_server():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "corral.cli", "ui", "--model", "default", "--port", str(port),
           "--max-new-tokens", "1024"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

        def output() -> str:
            log.seek(0)
            return log.read()[-3000:]

        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, f"corral ui exited:\n{output()}"
                assert time.monotonic() < deadline, f"corral ui did not come up:\n{output()}"
                try:
                    if httpx.get(url + "/corral/status", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            print(output())


def status(url: str) -> dict:
    return httpx.get(url + "/corral/status", timeout=5).json()


def wait_idle(url: str, timeout: float = 30) -> dict:
    """Until the engine runs nothing and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        s = status(url)
        if s["num_running"] == s["num_waiting"] == 0 and s["num_free_blocks"] == s[
                "num_total_blocks"]:
            return s
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.1)


def last_bot_text(page) -> str:
    bots = page.locator(BOT)
    return bots.last.inner_text() if bots.count() else ""


def busy(page) -> bool:
    """Gradio shows the chatbot's status tracker while an event streams into it."""
    tracker = page.locator('#chatbot [data-testid="status-tracker"]')
    return tracker.count() > 0 and "hide" not in (tracker.first.get_attribute("class") or "")


def watch_answer(page, n_bots: int, timeout: float = 60) -> tuple[str, list[int]]:
    """Poll the newest bot message until its event is over; return the final text and every
    distinct length seen on the way (the pieces)."""
    lengths: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"answer did not finish: {lengths}"
        text = last_bot_text(page) if page.locator(BOT).count() >= n_bots else ""
        if text and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        elif text and not busy(page):
            return text, lengths
        page.wait_for_timeout(40)


def wait_growing(page, n_bots: int, min_chars: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while page.locator(BOT).count() < n_bots or len(last_bot_text(page)) < min_chars:
        assert time.monotonic() < deadline, "the answer never started"
        page.wait_for_timeout(50)


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def send(page, text: str) -> None:
    page.fill("#user-input textarea", text)
    page.click("#send")


def open_tab(browser, url: str, outside: list[str]):
    page = browser.new_page(viewport={"width": 1100, "height": 1100})
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:"))
            else outside.append(r.url))
    page.goto(url + "/")
    page.locator("#model-info").filter(has_text="SmolLM2").wait_for(timeout=30_000)
    page.get_by_text("Advanced options").click()
    set_number(page, "temperature", 0)  # greedy: repeatable answers
    return page


def test_chat_in_a_real_browser(ui_server):
    from playwright.sync_api import sync_playwright

    url = ui_server
    ARTIFACTS.mkdir(exist_ok=True)
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            a = open_tab(browser, url, outside)
            # The header names the model, its size, dtype and context length.
            assert "135M parameters · float32 · 8,192-token context" in a.inner_text(
                "#model-info")
            set_number(a, "max-tokens", 24)

            # 1. Ask (Enter); the answer arrives in pieces.
            a.fill("#user-input textarea", "What is your name?")
            a.keyboard.press("Enter")
            first, lengths = watch_answer(a, n_bots=1)
            assert len(lengths) >= 3 and lengths == sorted(lengths), lengths
            assert "Zorblax" not in first

            # 2. A system prompt that names the model, then Retry: the new answer uses it.
            a.fill("#system-prompt textarea", "Your name is Zorblax.")
            a.click("#retry")
            a.wait_for_function(
                "([sel, old]) => { const b = document.querySelectorAll(sel);"
                " return b.length === 1 && b[0].innerText !== old; }",
                arg=[BOT, first], timeout=30_000)
            second, _ = watch_answer(a, n_bots=1)
            assert "Zorblax" in second, second
            assert a.locator('[data-testid="user"]').count() == 1  # retry, not a new turn
            a.screenshot(path=str(ARTIFACTS / "ui_system_prompt.png"), full_page=True)

            # 3. A second tab streams a long answer; tab A chats meanwhile and is not held up.
            b = open_tab(browser, url, outside)
            set_number(b, "max-tokens", 1000)
            set_number(b, "repetition-penalty", 1.2)  # the penalty path runs in the engine too
            send(b, "Write a very long story about a dragon.")
            wait_growing(b, n_bots=1, min_chars=20)
            send(a, "Thanks!")
            thanks, _ = watch_answer(a, n_bots=2)
            assert thanks and not thanks.startswith("⚠️")
            assert status(url)["num_running"] == 1 and busy(b)  # B still going after A's turn
            assert a.locator(BOT).count() == 2 and b.locator(BOT).count() == 1
            assert "dragon" not in a.inner_text("#chatbot")  # independent histories
            assert "Zorblax" not in b.inner_text("#chatbot")

            # 4. Stop in tab B mid-answer: the text stops growing and the engine goes idle.
            b.click("#stop")
            wait_idle(url)
            stopped = last_bot_text(b)
            b.wait_for_timeout(1500)
            assert last_bot_text(b) == stopped
            deadline = time.monotonic() + 15
            while busy(b):  # the page leaves its "generating" state too
                assert time.monotonic() < deadline, "the chat still looks busy after Stop"
                b.wait_for_timeout(100)
            assert 20 <= len(stopped) < 2000  # well short of 1000 tokens

            # 5. A prompt longer than the context: a readable message in the chat.
            send(a, "hello " * 9000)
            a.locator(BOT).nth(2).wait_for(timeout=30_000)
            error = last_bot_text(a)
            assert error.startswith("⚠️") and "this model's context is 8192 tokens" in error
            assert "Traceback" not in a.content()

            # The page is still usable after a stop and an error: the next turn answers.
            set_number(a, "max-tokens", 8)
            send(a, "Thanks again!")
            again, _ = watch_answer(a, n_bots=4)
            assert again and not again.startswith("⚠️")

            a.screenshot(path=str(ARTIFACTS / "ui_chat.png"), full_page=True)
            b.screenshot(path=str(ARTIFACTS / "ui_stopped.png"), full_page=True)
            assert outside == [], f"the page reached outside the machine: {outside}"
        finally:
            browser.close()
    wait_idle(url)
