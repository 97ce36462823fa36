"""The web page in a real browser: Debian's Chromium (headless) driven by Playwright.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` Python package;
Playwright's own browser download is never used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.service import unsafe_caption

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs" / "screenshots"

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_search_page_redirects_an_unsafe_query_and_shows_no_unsafe_result(browser, server, world):
    query = unsafe_caption(world, server)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    assert not page.locator("#token").is_visible()  # only safety=off asks for a token
    page.fill("#query", query)
    page.click("#search-button")
    page.wait_for_selector("#results .card")
    notice = page.locator("#notice")
    assert notice.is_visible()
    assert "moved toward safe content" in notice.inner_text()
    cards = page.locator("#results .card")
    assert cards.count() >= 1
    assert page.locator('#results .card[data-unsafe="true"]').count() == 0
    assert page.locator("#results .badge.unsafe").count() == 0
    # every image result actually loaded from /v1/media
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    assert "query flagged unsafe" in page.inner_text("#report")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "search-unsafe-query.png"), full_page=True)

    # an image upload searches too, and the notice follows the new query
    image = next((world.data / "coco" / "val2017").glob("*.jpg"))
    page.set_input_files("#image-file", str(image))
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('image')")
    assert page.locator("#results .card").count() >= 1
    assert page.locator('#results .card[data-unsafe="true"]').count() == 0
    page.screenshot(path=str(SCREENSHOTS / "search-upload.png"), full_page=True)

    # safety=off asks for the moderator token; without it the server's message is shown
    page.set_input_files("#image-file", [])
    page.select_option("#safety", "off")
    assert page.locator("#token").is_visible()
    page.fill("#query", "a cat")
    page.click("#search-button")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('401')")
    assert "moderator token" in page.inner_text("#status")
    assert errors == []
    page.close()
