"""A line that keeps its promise (MAX_WAIT_S): a new photo that would be done later than the cap is refused at once,
with the wait in the sentence, before anything reaches a backend; the page's wait line says the line is closed."""

from __future__ import annotations

import httpx
import pytest
from conftest import TLS, stack, submit, visitor, wait_until
from gradio_client.exceptions import AppError

import photos
import waiting
from wording import about

CAP_S = 1.5  # the promise; each stand-in job takes 1 s, so four held jobs make a line of about twice it


def test_a_photo_that_would_wait_longer_than_the_cap_is_refused_before_it_reaches_a_backend(
    private_app, public_app, monkeypatch
):
    reads: list[str] = []
    read = photos.photo_bytes
    monkeypatch.setattr(photos, "photo_bytes", lambda path, *limits: reads.append(path.name) or read(path, *limits))
    with stack(private_app, public_app, service_time=1.0, front={"max_wait_s": 0}) as s:  # no cap while it fills
        s.standin.hold()
        held = [submit(visitor(s.front))]
        s.standin.wait_inside(1)
        held += [submit(visitor(s.front)) for _ in range(3)]  # one beside the GPU, two in the backend's queue
        figure = lambda: httpx.get(f"{s.front}backdrop/wait", verify=TLS).json()  # noqa: E731
        pool = s.front_app.relay.pool
        full = lambda: pool.backends[0].sent == 4 and (figure()["seconds"] or 0) >= 2 * CAP_S  # noqa: E731
        wait_until(full, what=lambda: f"all four joined the backend's queue, a line of twice the cap: {figure()}")
        s.front_app.relay.wait_line.max_wait_s = CAP_S  # the promise, with the line at twice it
        sent, entered, read_before = pool.backends[0].sent, s.standin.entered, len(reads)
        line = figure()
        with pytest.raises(AppError) as refused:
            submit(visitor(s.front)).result(timeout=60)
        assert (pool.backends[0].sent, s.standin.entered) == (sent, entered)  # nothing reached the backend
        assert len(reads) == read_before  # nor was its photo read: no kept result could have answered it
        s.standin.release_all()
        for job in held:
            assert job.result(timeout=60)[2].startswith("Done in ")
        wait_until(lambda: not figure()["closed"], what="the line open again once it is short")
    sentence = str(refused.value)
    assert sentence.startswith("The line is too long right now: a photo sent now would be done in about ")
    assert sentence.endswith(
        f"and this Space lets no one wait more than {about(CAP_S).removeprefix('about ')}. "
        "Please try again in a few minutes."
    )
    assert line["closed"] is True
    assert line["text"].startswith("The line is closed for now: a photo sent now would be done in about ")


def test_the_line_promise_is_kept_to_the_figure_the_page_shows():
    class Backend:  # what WaitLine reads of a pool: its backends' figures (backends.py), here fixed
        def __init__(self, seconds: float) -> None:
            self.figures = type("Figures", (), {"jobs": {"a": 1}, "gap": 1.0, "expected_finish": lambda *_: seconds})()

    class Pool:
        def __init__(self, seconds: float) -> None:
            self.backends = [Backend(seconds)]
            self.line: list = []  # no photo waits for a backend that is away

        def ranked(self, _now: float) -> list:
            return self.backends

    assert waiting.WaitLine(Pool(30.0), max_wait_s=30, about=about).closed(30.0) is False  # as long as promised
    assert waiting.WaitLine(Pool(30.4), max_wait_s=30, about=about).closed(30.4) is False  # "about 30 s": as promised
    assert waiting.WaitLine(Pool(10.3), max_wait_s=10, about=about).closed(10.3) is False  # "about 10 s" too
    assert waiting.WaitLine(Pool(10.6), max_wait_s=10, about=about).closed(10.6) is True  # "about 11 s": longer
    line = waiting.WaitLine(Pool(31.0), max_wait_s=30, about=about)
    assert line.figure()["closed"] is True
    with pytest.raises(waiting.LineTooLong):
        line.admit()
    waiting.WaitLine(Pool(9999.0), max_wait_s=0, about=about).admit()  # 0: no promise, no refusal
    waiting.WaitLine(None, max_wait_s=30, about=about).admit()  # no backend: the endpoint says so itself
