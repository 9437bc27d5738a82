"""The public page in headless Chromium: the example photo, Run, the live status line, and both results."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import API, EXAMPLE_PHOTO, WAIT_S, stack, visitor, wait_until
from gradio_client import handle_file
from playwright.sync_api import ConsoleMessage, Page, Response, expect, sync_playwright

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
PAGE_WAIT_MS = int(WAIT_S * 1000)  # how long the page may take to show a state before the test calls it broken
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
pytestmark = pytest.mark.long


@pytest.fixture
def chromium_path() -> str:
    if not CHROMIUM.exists():
        if os.getenv("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must run the browser test (apt-get install chromium).")
        pytest.skip(f"{CHROMIUM} is missing")
    return str(CHROMIUM)


@dataclass
class Watched:
    """A page, and what went wrong on it: requests turned away (401, 403, 404: the guard, or a route gone, also as
    the console reports them) and the page's own errors. A test asserts both empty at its end."""

    page: Page
    refused: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def chromium_page(chromium_path: str, viewport: dict[str, int]) -> Iterator[Watched]:
    """A page in headless Chromium at this size, watched (`Watched`); the browser is closed at the end."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            watched = Watched(browser.new_page(viewport=viewport))
            watched.page.set_default_timeout(PAGE_WAIT_MS)

            def on_response(response: Response) -> None:
                if response.status in (401, 403, 404):
                    watched.refused.append(f"{response.request.method} {response.url} -> {response.status}")

            def on_console(message: ConsoleMessage) -> None:
                if re.search(r"\b40[134]\b", message.text):
                    watched.refused.append(f"console: {message.text}")

            watched.page.on("response", on_response)
            watched.page.on("console", on_console)
            watched.page.on("pageerror", lambda error: watched.errors.append(str(error)))
            yield watched
        finally:
            browser.close()


@pytest.mark.browser
def test_a_visitor_runs_the_example_photo_and_sees_the_queue_then_both_results(
    private_app, public_app, chromium_path, tmp_path
):
    with stack(private_app, public_app) as s, chromium_page(chromium_path, DESKTOP) as watched:
        page = watched.page
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
        s.standin.hold()  # the others' jobs stay on the GPU and beside it until this visitor is in line
        others = [
            visitor(s.front).submit(handle_file(str(EXAMPLE_PHOTO)), "casual", "female", api_name=API)
            for _ in range(2)  # one on the GPU, one decoded beside it and waiting for the GPU
        ]
        wait_until(lambda: any("Waiting for the GPU" in out[2] for other in others for out in other.outputs()))
        page.locator("#run").click()
        expect(page.locator("#status")).to_contain_text("in line")
        s.standin.release_all()

        expect(page.locator("#status")).to_contain_text("Done in ")
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

    first = {
        what: next((i for i, line in enumerate(lines) if what in line), None)
        for what in ("in line", "Working on your photo", "Done in ")
    }
    assert None not in first.values(), lines
    assert first["in line"] < first["Working on your photo"] < first["Done in "], lines
    assert watched.refused == []
    assert watched.errors == []


@pytest.mark.browser
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_a_visitor_tries_a_second_style_keeps_the_result_and_a_refusal_leaves_the_pictures(
    private_app, public_app, chromium_path, tmp_path, viewport
):
    front = {"max_jobs_per_visitor": 1, "visitor_rate": ""}  # every visitor: 127.0.0.1
    with stack(private_app, public_app, front=front) as s, chromium_page(chromium_path, viewport) as watched:
        page = watched.page
        page.goto(s.front)
        expect(page.locator("#wait")).to_contain_text("No wait right now")  # the line, before any Run

        page.get_by_role("button", name="Use the example photo").click()
        expect(page.locator("#photo img")).to_have_count(1)  # uploaded, then shown
        page.wait_for_function(f"() => ({IMAGE_SHOWN})(document.querySelector('#photo img'))")
        shown = []
        for category in ("casual", "formal"):
            if category != "casual":
                page.get_by_label("Category").click()
                page.get_by_role("option", name=category).click()
            page.locator("#run").click()
            expect(page.locator("#status")).to_contain_text("Done in ")
            expect(page.locator("#result img")).not_to_have_attribute("src", shown[-1] if shown else "")
            shown.append(page.locator("#result img").get_attribute("src"))
            assert_no_error_badge(page)
        assert s.standin.prompts[-1] != s.standin.prompts[-2]  # the second style really was asked for
        assert page.locator("#photo img").count() == 1  # the photo stayed for the second try: no new upload

        # Both results' download URLs still answer after they were shown (fetched), the first after a second run.
        assert [page.request.get(src).status for src in shown] == [200, 200]

        # Someone (here: this same visitor, from Python) has a photo on the GPU: the line shows it, and this
        # visitor's fair share (one photo at a time) refuses the next Run. The pictures stay; the line says why.
        s.standin.hold()
        held = visitor(s.front).submit(handle_file(str(EXAMPLE_PHOTO)), "casual", "male", api_name=API)
        s.standin.wait_inside(1)
        expect(page.locator("#wait")).to_contain_text("1 photo ahead")
        pictures = [page.locator(f"{output} img").get_attribute("src") for output in ("#overlay", "#result")]
        page.locator("#run").click()
        expect(page.locator("#status")).to_contain_text("You already have 1 photo in line.")
        assert "Done in" not in page.locator("#status").inner_text()
        assert [page.locator(f"{output} img").get_attribute("src") for output in ("#overlay", "#result")] == (pictures)
        assert_no_error_badge(page)
        page.screenshot(path=tmp_path / "refused.png", full_page=True)
        s.standin.release_all()
        assert held.result(timeout=30)[2].startswith("Done in ")
        assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    assert watched.refused == []
    assert watched.errors == []


def assert_no_error_badge(page) -> None:
    """Gradio marks a failed event's outputs with an "Error" label and shows a toast: neither may appear."""
    for output in ("#overlay", "#result", "#status"):
        expect(page.locator(output).get_by_text("Error", exact=True)).to_have_count(0)
    expect(page.locator(".toast-body")).to_have_count(0)


@pytest.mark.browser
def test_a_signed_in_visitor_sees_their_name_and_signs_out_and_the_line_forgets_their_finished_job(
    private_app, public_app, chromium_path, hub, monkeypatch
):
    """Gradio's local OAuth mock signs in this machine's account (whoami on the stand-in Hub). The page polls the
    line only at load here (POLL_S: an hour), so the line it shows after the run is the one its own job's end asked
    for."""
    import waiting

    hub.accounts["hf_grace_machine"] = "grace"
    monkeypatch.setenv("HF_TOKEN", "hf_grace_machine")
    monkeypatch.setattr(waiting, "POLL_S", 3600)
    with (
        stack(private_app, public_app, front={"sign_in": True}) as s,
        chromium_page(chromium_path, DESKTOP) as watched,
    ):
        page = watched.page
        page.goto(s.front)
        button = page.locator("#sign-in")
        expect(button).to_have_text("Sign in with Hugging Face")
        expect(page.locator("#signed-in-as")).not_to_contain_text("Signed in")
        button.click()  # the mock's sign-in, and back to the page
        expect(page.locator("#signed-in-as")).to_contain_text("Signed in as grace")
        expect(button).to_have_text("Sign out")

        s.standin.hold()  # someone else's photo is on the GPU when the page loads: the line says so
        other = visitor(s.front).submit(handle_file(str(EXAMPLE_PHOTO)), "casual", "male", api_name=API)
        s.standin.wait_inside(1)
        page.reload()
        expect(page.locator("#wait")).to_contain_text("1 photo ahead")
        page.get_by_role("button", name="Use the example photo").click()
        expect(page.locator("#photo img")).to_have_count(1)  # uploaded, then shown
        page.wait_for_function(f"() => ({IMAGE_SHOWN})(document.querySelector('#photo img'))")
        page.locator("#run").click()
        expect(page.locator("#status")).to_contain_text(re.compile("in line|Waiting for the GPU"))  # behind it
        s.standin.release()  # the other's job ends first; then this visitor's is the last one out
        assert other.result(timeout=30)[2].startswith("Done in ")
        s.standin.release_all()
        expect(page.locator("#status")).to_contain_text("Done in ")
        expect(page.locator("#wait")).to_have_text("No wait right now")  # asked as the job ended: not counted

        page.locator("#sign-in").click()
        expect(page.locator("#sign-in")).to_have_text("Sign in with Hugging Face")
        expect(page.locator("#signed-in-as")).not_to_contain_text("Signed in")
    assert watched.refused == []
    assert watched.errors == []
