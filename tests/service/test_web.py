"""The web page in a real browser: Debian's Chromium (headless) driven by Playwright.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright`` Python package;
Playwright's own browser download is never used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from indexer.store import content_id
from tests.helpers.service import ADMIN, MODERATOR, fresh_png, live, make_settings, private_media, unsafe_caption

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


def test_staff_add_an_image_and_take_a_result_down(browser, world, tmp_path):
    """The staff panel: with the admin token an image is added from the page; with a moderator token each result
    has a take-down button that asks for a reason, and the item is gone from the next search."""
    media = private_media(world, tmp_path)
    with live(make_settings(world, tmp_path, media)) as server:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        assert not page.locator("#add-form").is_visible() and not page.locator("#token").is_visible()
        page.click("#staff summary")
        assert page.locator("#token").is_visible()  # the staff panel asks for a token

        fresh = tmp_path / "fresh.png"
        fresh.write_bytes(fresh_png(21))
        page.fill("#token", ADMIN)
        page.set_input_files("#add-file", str(fresh))
        page.fill("#add-caption", "added from the page")
        page.fill("#add-tags", "web, fresh")
        page.click("#add-button")
        page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Added item')")
        added = content_id(fresh.read_bytes())
        assert added in page.inner_text("#status")
        with server.client(MODERATOR) as mod:
            item = mod.get(f"/v1/items/{added}").json()
        assert item["caption"] == "added from the page" and item["tags"] == ["web", "fresh"]

        page.fill("#token", MODERATOR)
        page.fill("#query", "a cat")
        page.click("#search-button")
        page.wait_for_selector("#results .card")
        first = page.locator("#results .card").first
        victim = first.get_attribute("data-id")
        first.locator(".takedown-open").click()
        first.locator(".takedown-confirm").click()  # no reason yet: refused on the page
        assert "reason" in page.inner_text("#status")
        first.locator(".takedown-reason").fill("reported from the page")
        first.locator(".takedown-confirm").click()
        page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Took down')")
        assert page.locator(f'#results .card[data-id="{victim}"]').count() == 0
        page.screenshot(path=str(SCREENSHOTS / "staff-takedown.png"), full_page=True)
        page.click("#search-button")
        page.wait_for_function("() => document.querySelector('#status').textContent.includes('results for')")
        assert page.locator(f'#results .card[data-id="{victim}"]').count() == 0
        with server.client(MODERATOR) as mod:
            assert mod.get(f"/v1/items/{victim}").status_code == 404
        # an ordinary visitor sees no take-down button
        page.click("#staff summary")
        assert page.locator("#results .card .takedown-open").first.is_visible() is False
        assert errors == []
        page.close()
