"""The public page in headless Chromium: the example photo, Run, the live status line, and both results."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import EXAMPLE_PHOTO, stack, visitor, wait_until
from gradio_client import handle_file
from playwright.sync_api import expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # without these Chromium reaches for hosts that are not there
    "--disable-component-update",
    "--disable-sync",
]
API = "/predict_api"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Every text the status line shows, in order, from the moment this runs.
RECORD_STATUS = """() => {
    const status = document.querySelector("#status");
    window.statusLines = [];
    new MutationObserver(() => {
        const text = status.innerText.trim();
        if (text && window.statusLines.at(-1) !== text) window.statusLines.push(text);
    }).observe(status, {subtree: true, childList: true, characterData: true});
}"""
IMAGE_SHOWN = "img => img.complete && img.naturalWidth"


@pytest.fixture
def chromium_path() -> str:
    if not CHROMIUM.exists():
        if os.getenv("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must run the browser test (apt-get install chromium).")
        pytest.skip(f"{CHROMIUM} is missing")
    return str(CHROMIUM)


@pytest.mark.browser
def test_a_visitor_runs_the_example_photo_and_sees_the_queue_then_both_results(
    private_app, public_app, chromium_path, tmp_path
):
    refused: list[str] = []  # the public app's guard (or anything else) turning the page away
    page_errors: list[str] = []

    def on_response(response) -> None:
        if response.status in (401, 403):
            refused.append(f"{response.request.method} {response.url} -> {response.status}")

    def on_console(message) -> None:
        if re.search(r"\b40[13]\b", message.text):
            refused.append(f"console: {message.text}")

    with (
        stack(private_app, public_app, service_time=1.5) as s,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=DESKTOP)
            page.set_default_timeout(10_000)  # a broken page fails in seconds, not Playwright's default 30
            page.on("response", on_response)
            page.on("console", on_console)
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(s.front)

            # The example button fetches the example and hands it to the photo input: a real upload, then shown.
            photo = page.locator("#photo img")
            expect(photo).to_have_count(0)
            with page.expect_response(lambda r: "/gradio_api/upload" in r.url and r.request.method == "POST") as up:
                page.get_by_role("button", name="Use the example photo").click()
            assert up.value.status == 200
            expect(photo).to_have_attribute("src", re.compile(rf"/gradio_api/file=.+/{EXAMPLE_PHOTO.name}$"))
            assert str(EXAMPLE_PHOTO.parent) not in photo.get_attribute("src")  # the uploaded copy, not the example
            page.wait_for_function(f"() => ({IMAGE_SHOWN})(document.querySelector('#photo img'))")

            # Someone else is on the GPU, so this visitor waits in line first.
            page.evaluate(RECORD_STATUS)
            others = [
                visitor(s.front).submit(handle_file(str(EXAMPLE_PHOTO)), "casual", "female", api_name=API)
                for _ in range(2)  # one on the GPU, one decoded beside it and waiting for the GPU
            ]
            wait_until(lambda: any("Waiting for the GPU" in out[2] for other in others for out in other.outputs()))
            page.locator("#run").click()

            expect(page.locator("#status")).to_contain_text("Done in ", timeout=15_000)
            for output, name in (("#overlay", "overlay"), ("#result", "result")):
                image = page.locator(f"{output} img")
                expect(image).to_have_attribute("src", re.compile(rf"/gradio_api/file=.+/{name}-\d+\.webp$"))
                page.wait_for_function(f"() => ({IMAGE_SHOWN})(document.querySelector('{output} img'))")
                assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [512, 512]
            lines = page.evaluate("window.statusLines")
            assert all(other.result(timeout=30)[2].startswith("Done in ") for other in others)

            page.screenshot(path=tmp_path / "desktop.png", full_page=True)
            page.set_viewport_size(PHONE)  # the same page on a phone: one column, nothing wider than the screen
            expect(page.locator("#run")).to_be_visible()
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            page.screenshot(path=tmp_path / "phone.png", full_page=True)
        finally:
            browser.close()

    first = {
        what: next((i for i, line in enumerate(lines) if what in line), None)
        for what in ("in line", "Working on your photo", "Done in ")
    }
    assert None not in first.values(), lines
    assert first["in line"] < first["Working on your photo"] < first["Done in "], lines
    assert refused == []
    assert page_errors == []
