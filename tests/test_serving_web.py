"""The web chat page in headless Chromium: send a message, watch the reply stream in, screenshot."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving_helpers import OrlikServer

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# Flags for a sandbox-less container with no network beyond loopback.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip
MODEL = "tiny-fp16"
KEY = "web-key"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (make chromium, or: apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrlikServer]:
    log = tmp_path_factory.mktemp("serve-web") / "serve.log"
    srv = OrlikServer([f"{MODEL}={tiny_checkpoint}"], "--preload", api_key=KEY, log=log)
    try:
        yield srv.wait()
    finally:
        srv.stop()


def add_ignore_eos(route: Any) -> None:
    body = json.loads(route.request.post_data or "{}")
    assert body.get("stream") is True, "the page asks for a streamed reply"
    route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))


def test_web_chat_streams_a_reply(server: OrlikServer, tmp_path: Path) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    shot = tmp_path / "web-chat.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            # A briefly trained tiny model may end its turn at once, leaving nothing to stream. The
            # page's own request goes out with ignore_eos added (the response is not touched), so the
            # reply is exactly max_tokens tokens long.
            page.route("**/v1/chat/completions", add_ignore_eos)
            page.goto(server.url + "/")
            assert "orlik" in page.title()
            # The key is asked for, kept in localStorage, and the model list loads with it.
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=30_000)
            assert page.input_value("#model") == MODEL
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "16")
            # Count how many times the reply's text changes: streamed means more than once.
            page.evaluate("""() => { window.__updates = 0; new MutationObserver((ms) => {
                for (const m of ms) if (m.target.closest && m.target.closest('.msg.assistant')) window.__updates++;
              }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
            page.fill("#input", "Cześć! Opowiedz coś o Krakowie.")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=120_000)
            reply = page.text_content(".msg.assistant .text")
            meta = page.inner_text(".msg.assistant .meta")
            updates = page.evaluate("window.__updates")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 5_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The page shows exactly what the API answers for the same greedy request.
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Cześć! Opowiedz coś o Krakowie."}],
        "temperature": 0, "max_tokens": 16, "ignore_eos": True})  # fmt: skip
    expected = r.json()["choices"][0]["message"]["content"]
    n = r.json()["usage"]["completion_tokens"]
    assert n == 16 and reply == expected and reply
    assert f"{n} tokens" in meta and "tok/s" in meta
    assert updates >= 3, f"the reply arrived in {updates} update(s), not streamed"
