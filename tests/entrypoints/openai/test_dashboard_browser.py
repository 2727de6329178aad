"""The dashboard in a real browser: headless Chromium (the system's, driven by Playwright)
on a real server with an API key, under a load of concurrent requests sharing a prefix.

The page must ask for the key, then show non-zero tokens per second, a prefix hit rate
above 0 and KV blocks in use that rise and fall back to 0. Screenshots go to the test's
tmp dir; JAXSERVE_DASHBOARD_SCREENSHOT=path also copies the one taken under load there
(docs/images/dashboard.png is one). Chromium comes from the system (`make test-all`
installs Debian's `chromium` where it can), or JAXSERVE_CHROMIUM names one; without any
the test skips and says so.
"""

import asyncio
import os
import re
import shutil
import threading
import time

import openai
import pytest

API_KEY = "dashboard-key"
# Enough work for several seconds of the tiny model: the page updates once a second.
NUM_REQUESTS, MAX_TOKENS = 128, 96
PREFIX = "You are a helpful assistant. Answer in one short sentence, please. " * 6


def find_chromium() -> str | None:
    for candidate in (os.environ.get("JAXSERVE_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome", "google-chrome-stable"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    return None


def run_load(url: str) -> None:
    """NUM_REQUESTS completions at once, each the shared prefix + its own question."""
    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
        await asyncio.gather(*[client.completions.create(
            model="tiny", prompt=f"{PREFIX}Question {i}: what is {i} + {i}?", max_tokens=MAX_TOKENS,
            extra_body={"ignore_eos": True}) for i in range(NUM_REQUESTS)])

    asyncio.run(main())


def read_tiles(page) -> dict[str, str]:
    return page.evaluate("""() => Object.fromEntries(
        ["tok-prompt", "tok-gen", "hit-rate", "kv-used"].map(
            (id) => [id, document.getElementById(id).textContent]))""")


def number(text: str) -> float:
    """A tile's first number ("12", "37.5 %", "9 / 511"); 0 for "–"."""
    head = text.split()[0] if text.strip() else "–"
    return 0.0 if head == "–" else float(head)


@pytest.mark.slow
def test_the_dashboard_shows_the_engine_at_work_in_chromium(start_server, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or "
                    "$JAXSERVE_CHROMIUM): `apt-get install chromium` (make test-all does it "
                    "as root) to run the dashboard's browser test")
    from playwright.sync_api import expect, sync_playwright

    # a small pool, so that the load fills a visible part of it
    server = start_server("--api-key", API_KEY, "--served-model-name", "tiny",
                          "--num-gpu-blocks-override", "384")
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/dashboard")
            expect(page.locator("#login")).to_be_visible()
            expect(page.locator("#main")).to_be_hidden()
            page.fill("#key", "wrong")
            page.click("#login button")
            expect(page.locator("#login-error")).to_have_text("wrong key")
            page.fill("#key", API_KEY)
            page.click("#login button")
            expect(page.locator("#status")).to_have_text("live", timeout=15_000)
            expect(page.locator("#model")).to_have_text("tiny")
            expect(page.locator("#login")).to_be_hidden()
            page.wait_for_timeout(1500)  # a second of the idle server on the charts

            load = threading.Thread(target=run_load, args=(server.url,))
            load.start()
            samples, under_load = [], tmp_path / "dashboard-under-load.png"
            shot = 0.0
            while load.is_alive():
                samples.append(read_tiles(page))
                busy = number(samples[-1]["kv-used"]) > 0 and number(samples[-1]["tok-gen"]) > 0
                # the last busy moment's (retaken each second): the longest history to show
                if busy and time.monotonic() - shot > 1:
                    page.screenshot(path=under_load, full_page=True)
                    shot = time.monotonic()
                time.sleep(0.2)
            load.join()
            expect(page.locator("#kv-used")).to_have_text(re.compile(r"^0 / 383$"), timeout=10_000)
            samples.append(read_tiles(page))
            page.wait_for_timeout(1500)
            done = tmp_path / "dashboard-done.png"
            page.screenshot(path=done, full_page=True)
            summaries = page.evaluate("window.jaxserveDashboard.summaries")
            browser.close()
    finally:
        assert server.stop() == 0, server.log()

    kv_used = [number(s["kv-used"]) for s in samples]
    assert max(number(s["tok-prompt"]) for s in samples) > 0
    assert max(number(s["tok-gen"]) for s in samples) > 0
    assert max(number(s["hit-rate"]) for s in samples) > 0, samples
    assert max(kv_used) > 0 and kv_used[-1] == 0, samples
    assert kv_used.index(max(kv_used)) < len(kv_used) - 1  # it rose, then fell back
    # what the charts drew: the same rise and fall, and every generated token
    used = [s["kv"]["used"] for s in summaries]
    assert max(used) > 0 and used[-1] == 0
    generated = sum(s["tokens"]["decode"] for s in summaries)
    assert generated == NUM_REQUESTS * (MAX_TOKENS - 1)  # each output's last token is not fed back
    for path in (under_load, done):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(data) < 3_000_000, len(data)
    copy_to = os.environ.get("JAXSERVE_DASHBOARD_SCREENSHOT")
    if copy_to:
        shutil.copyfile(under_load, copy_to)
