"""Nothing is lost when a backend restarts (a redeploy, a crash): every job it had, waiting or running, is sent again
once a backend takes it, and its visitor is told the truth meanwhile; a photo that was running on a backend that
went away twice is not sent a third time; a visitor who leaves meanwhile is not sent again; the photo is read back
from the visitor's kept upload, never held while the job waits."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import httpx
import pytest
from conftest import (
    EXAMPLE_PHOTO,
    TLS,
    TOKEN,
    backend,
    free_port,
    front_app,
    kill,
    latest,
    pool,
    running,
    statuses,
    submit,
    visitor,
    wait_until,
)
from gradio_client.exceptions import AppError
from standin import StandInPipeline

import backends
import photos
from pool import Backends
from relay import REPEAT_CRASH

RESTARTING = "The image service is restarting · your photo is kept"


def at_the_backend(pool: Backends, *jobs, out: int) -> bool:
    """The backend has `out` of this front's jobs, and each of `jobs` has heard from it (a place, or a start)."""
    heard = all(latest(job).startswith(("You are", "Working")) for job in jobs)
    return heard and len(pool.backends[0].figures.jobs) == out


@contextlib.contextmanager
def backend_at(private_app, port: int, standin: StandInPipeline) -> Iterator[object]:
    """The private app with this stand-in on this port (again, after a restart), killed at the end if still up."""
    back = private_app.create_app(standin)
    private_app.serve(back, token=TOKEN, warm_up=False, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield back
    finally:
        kill(back)


@pytest.fixture
def one_backend(public_app):
    """A front over one backend address, each job's wait for it bounded by a minute (a bound, not a wait)."""
    port = free_port()
    pool = Backends.connect([f"http://127.0.0.1:{port}/"], TOKEN, wake_timeout=60)
    with running(front_app(public_app, pool), public_app.serve) as front:
        yield port, front, pool


def test_a_waiting_job_and_a_running_job_outlive_their_backends_restart(private_app, one_backend):
    port, front, pool = one_backend
    first = StandInPipeline()
    first.hold()
    with backend_at(private_app, port, first) as back:
        running_job = submit(visitor(front))
        first.wait_inside(1)
        wait_until(lambda: "Painting the backdrop" in latest(running_job), what="the front to hear work began")
        beside, queued = submit(visitor(front)), submit(visitor(front))  # in the backend's other slot, and in line
        wait_until(lambda: at_the_backend(pool, beside, queued, out=3), what="the three jobs at the backend")
        kill(back)  # a restart: the process goes, its streams are cut
        jobs = (running_job, beside, queued)
        wait_until(lambda: all(latest(job).startswith(RESTARTING) for job in jobs), what=lambda: [*map(latest, jobs)])
        line = httpx.get(f"{front}backdrop/wait", verify=TLS).json()  # what a visitor about to press Run reads
    first.release_all()
    again = StandInPipeline()
    with backend_at(private_app, port, again):
        outcomes = [job.result(timeout=60)[2] for job in jobs]
    assert [outcome[:8] for outcome in outcomes] == ["Done in "] * 3
    assert again.entered == 3  # each job ran on the backend that came back
    starting = "The image service is starting · 3 photos wait for it"
    assert line == {"ahead": 3, "seconds": None, "closed": False, "text": starting}
    assert (pool.resends.running, pool.resends.waiting) == (1, 2)
    for job in (beside, queued):  # told their place again once it was back, never that work on them was lost
        after = statuses(job)[
            statuses(job).index(next(line for line in statuses(job) if line.startswith(RESTARTING))) :
        ]
        assert any(" in line" in line or line.startswith("Working") for line in after), after


def test_a_photo_running_when_its_backend_went_away_twice_is_not_sent_a_third_time(private_app, one_backend):
    port, front, pool = one_backend
    first, second = StandInPipeline(), StandInPipeline()
    first.hold()
    with backend_at(private_app, port, first) as back:
        job = submit(visitor(front))
        first.wait_inside(1)
        wait_until(lambda: "Painting the backdrop" in latest(job), what="the front to hear work began")
        kill(back)  # a first time, while it runs
        wait_until(lambda: latest(job).startswith(RESTARTING), what=lambda: latest(job))
    first.release_all()
    second.hold()
    with backend_at(private_app, port, second) as back:
        second.wait_inside(1)  # sent again, and running again
        wait_until(lambda: "Painting the backdrop" in latest(job), what="the front to hear work began again")
        kill(back)  # a second time, while it runs
    second.release_all()
    third = StandInPipeline()
    with backend_at(private_app, port, third), pytest.raises(AppError) as refused:
        job.result(timeout=60)
    assert str(refused.value) == REPEAT_CRASH
    assert third.entered == 0  # no third run
    assert pool.resends.running == 1  # sent again once; not the second time


def test_a_visitor_who_leaves_while_the_backend_is_away_is_not_sent_again(private_app, one_backend):
    port, front, pool = one_backend
    first = StandInPipeline()
    first.hold()
    with backend_at(private_app, port, first) as back:
        blocker = submit(visitor(front))  # on the GPU
        first.wait_inside(1)
        leaver = submit(visitor(front))
        wait_until(lambda: at_the_backend(pool, leaver, out=2), what="the leaver at the backend")
        kill(back)
        wait_until(lambda: latest(leaver).startswith(RESTARTING), what=lambda: latest(leaver))
    first.release_all()
    leaver.cancel()  # Stop, while the backend is away
    later = submit(visitor(front))  # came after the leaver: were the leaver still in line, it would go first
    wait_until(lambda: latest(later).startswith(("Waking", RESTARTING)), what=lambda: latest(later))
    again = StandInPipeline()
    with backend_at(private_app, port, again):
        assert later.result(timeout=60)[2].startswith("Done in ")
        assert blocker.result(timeout=60)[2].startswith("Done in ")
    assert again.entered == 2  # the blocker's and the later visitor's jobs: not the leaver's


def test_a_waiting_job_holds_no_photo_and_reads_it_again_from_the_upload_to_resend(
    private_app, one_backend, monkeypatch
):
    port, front, pool = one_backend
    reads: list[str] = []
    read = photos.photo_bytes
    monkeypatch.setattr(photos, "photo_bytes", lambda path, *limits: reads.append(path.name) or read(path, *limits))
    first = StandInPipeline()
    first.hold()
    with backend_at(private_app, port, first) as back:
        blocker = submit(visitor(front))
        first.wait_inside(1)
        waiting = submit(visitor(front))
        wait_until(lambda: at_the_backend(pool, waiting, out=2), what="a job waiting at the backend")
        held = [photo for photo in gc.get_objects() if isinstance(photo, photos.Photo)]
        assert len(held) == 2  # the two jobs' photos ...
        assert all(photo._first is None for photo in held)  # ... each sent, and holding no bytes
        assert reads == [EXAMPLE_PHOTO.name] * 2  # read once each, to send
        kill(back)
        wait_until(lambda: latest(waiting).startswith(RESTARTING), what=lambda: latest(waiting))
    first.release_all()
    with backend_at(private_app, port, StandInPipeline()):
        assert waiting.result(timeout=60)[2].startswith("Done in ")
        assert blocker.result(timeout=60)[2].startswith("Done in ")
    # And again from the upload on disk, for each try to send it again (the first in line tries every 2 s).
    assert len(reads) >= 4
    assert set(reads) == {EXAMPLE_PHOTO.name}


def test_a_backend_that_went_away_is_taken_back_as_soon_as_it_answers(private_app, public_app, monkeypatch):
    """A backend that fails to take jobs is probed less and less often (here: once an hour); one that went away while
    serving (a restart) is expected back soon, and probed every few seconds until it is."""
    monkeypatch.setattr(backends, "RETRY_DOWN_MAX_S", 3600.0)
    with backend(private_app, 0.0) as (other_url, _, _):
        port = free_port()
        pool_of_two = pool(f"http://127.0.0.1:{port}/", other_url, retry_after=3600)
        with running(front_app(public_app, pool_of_two), public_app.serve) as front:
            first = StandInPipeline()
            first.hold()
            with backend_at(private_app, port, first) as back:
                wait_until(lambda: not pool_of_two.backends[0].down, what="the first backend taken")
                job = submit(visitor(front))
                first.wait_inside(1)  # the first backend had it: each backend's figures start alike
                kill(back)
            first.release_all()
            assert job.result(timeout=60)[2].startswith("Done in ")  # done on the other
            assert pool_of_two.backends[0].down
            with backend_at(private_app, port, StandInPipeline()):
                wait_until(lambda: not pool_of_two.backends[0].down, what="the restarted backend taken back")
