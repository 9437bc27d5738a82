"""Several backends behind one public app: routing by expected finish, skipping a down backend, losing none.

Real private apps (stand-in pipelines) on loopback behind the real public app, called with the real gradio_client.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from conftest import (
    backend,
    free_port,
    front_app,
    kill,
    latest,
    load_app,
    outcome,
    pool,
    queued,
    running,
    submit,
    visitor,
    wait_until,
)
from standin import StandInPipeline

import backends
import relay
from backends import Figures, SentJob
from pool import Backends
from relay import FAILED


def jobs_run(standin: StandInPipeline, warmed: bool = True) -> int:
    return len(standin.intervals) - (1 if warmed else 0)


def test_two_backends_share_the_work_and_the_slower_one_gets_fewer_jobs(private_app, public_app):
    with (
        backend(private_app, 0.1) as (fast_url, fast, _),
        backend(private_app, 0.6) as (slow_url, slow, _),
        running(front_app(public_app, pool(slow_url, fast_url)), public_app.serve) as front,
    ):
        jobs = [submit(visitor(front)) for _ in range(10)]
        outcomes = [outcome(job) for job in jobs]
        statuses = [[output[2] for output in job.outputs()] for job in jobs]
    assert outcomes == ["Done"] * 10
    assert jobs_run(fast) + jobs_run(slow) == 10
    assert jobs_run(slow) >= 1, "the slower backend was left idle"
    assert jobs_run(fast) > jobs_run(slow), (jobs_run(fast), jobs_run(slow))
    waited = [lines for lines in statuses if any(" in line" in line for line in lines)]
    assert waited, statuses  # visitors still see their place, in the queue of the backend they were sent to
    assert fast.max_inside == slow.max_inside == 1


def test_a_down_backend_is_skipped_unnoticed_and_used_again_once_it_answers(private_app, public_app):
    dead_port = free_port()
    backends = pool(f"http://127.0.0.1:{dead_port}/", "", retry_after=0.2)
    with backend(private_app, 0.1) as (live_url, live, _):
        backends.backends[1].target = live_url
        with running(front_app(public_app, backends), public_app.serve) as front:
            first = submit(visitor(front))
            assert outcome(first) == "Done"  # the first choice (nothing listening) was skipped
            assert not any("Waking" in output[2] for output in first.outputs())
            assert backends.backends[0].down
            assert jobs_run(live) == 1
            with backend(private_app, 0.1, port=dead_port) as (_, revived, _):
                wait_until(lambda: not backends.backends[0].down)  # probed in the background
                assert outcome(submit(visitor(front))) == "Done"
                assert jobs_run(revived) == 1  # idle and first in the list: it took the job
    assert jobs_run(live) == 1


@contextlib.contextmanager
def answering(status: int) -> Iterator[tuple[str, list[str]]]:
    """A server on loopback that answers every request with this HTTP status; yields its URL and the paths asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", asked
    finally:
        server.shutdown()
        server.server_close()


def test_a_backend_answering_an_unexpected_error_is_skipped_and_the_job_done_on_another(private_app, public_app):
    with answering(405) as (odd_url, asked), backend(private_app, 0.1) as (live_url, live, _):
        backends = pool(odd_url, live_url)
        with running(front_app(public_app, backends), public_app.serve) as front:
            assert (
                outcome(submit(visitor(front))) == "Done"
            )  # the first choice answered 405: the job went on to the other
        assert asked == ["/config"]
        assert backends.backends[0].down
        with running(front_app(public_app, pool(odd_url)), public_app.serve) as front:
            assert outcome(submit(visitor(front))) == FAILED  # no other backend: the visitor gets the sentence
    assert jobs_run(live) == 1


def test_a_backend_closed_mid_run_loses_no_job_the_other_takes_them_all(private_app, public_app):
    """Both backends busy, one dies: its jobs, the one on its GPU included, are sent again and done on the other."""
    other_port = free_port()
    with backend(private_app, 0.2) as (dying_url, dying_standin, dying):
        backends = pool(dying_url, f"http://127.0.0.1:{other_port}/", retry_after=0.2)
        dying_standin.hold()
        with running(front_app(public_app, backends), public_app.serve) as front:
            jobs = [submit(visitor(front)) for _ in range(3)]  # nothing listens at the other yet: all go here
            wait_until(lambda: dying_standin.inside == 1 and queued(dying_url) == 1)  # on its GPU, beside, queued
            with backend(private_app, 0.2, port=other_port) as (_, other, _):
                other.hold()
                wait_until(lambda: not backends.backends[1].down)  # probed in the background: it takes jobs
                jobs += [submit(visitor(front)) for _ in range(3)]  # at least the first goes to the idle one
                wait_until(lambda: other.inside == 1)
                # The front heard that work began on both GPUs' jobs.
                wait_until(lambda: sum("Painting the backdrop" in latest(job) for job in jobs) == 2)
                kill(dying)  # its job on the GPU is held
                other.release_all()
                outcomes = [outcome(job) for job in jobs]
    assert outcomes == ["Done"] * 6, outcomes
    assert jobs_run(other) == 6  # its own three, and the three the dying one had: the one on its GPU too
    assert (backends.resends.running, backends.resends.waiting) == (1, 2)


def test_visitors_waiting_for_a_sleeping_space_share_one_hub_lookup_and_one_wake_request(monkeypatch):
    """No real Hub in tests: its `space_info` is a stand-in that counts calls and says the Space is asleep."""
    lookups, wakes, results = [], [], []

    class Hub:
        def space_info(self, repo_id: str, token: object) -> SimpleNamespace:
            lookups.append(repo_id)
            return SimpleNamespace(runtime=SimpleNamespace(stage="SLEEPING"), host="https://me-gpu.hf.space")

    monkeypatch.setattr(relay, "HfApi", Hub)
    monkeypatch.setattr(backends, "RETRY_EVERY_S", 3600.0)  # a failed lookup's answer stands for the whole test

    async def scenario() -> None:
        (space,), waking = Backends.connect(["me/gpu"], None).backends, asyncio.Event()

        def wake(host: str) -> Coroutine[object, object, object]:
            wakes.append(host)
            return waking.wait()  # the wake request is under way until the end

        monkeypatch.setattr(space, "_wake", wake)
        for retry in range(3):  # 20 visitors at once, 3 times; before the last, the retry period is over
            if retry == 2:
                space._lookup_again_at = 0.0
            results.extend(await asyncio.gather(*(space._resolve() for _ in range(20)), return_exceptions=True))
        waking.set()

    asyncio.run(scenario())
    assert [type(result).__name__ for result in results] == ["NotReady"] * 60
    assert lookups == ["me/gpu"] * 2  # one for the first two tries (the answer stood), one after the period
    assert wakes == ["https://me-gpu.hf.space"]  # one wake request, still under way at the second lookup


def test_backend_takes_a_comma_separated_list_with_one_token(monkeypatch):
    environment = {"BACKEND": " me/gpu-1, http://10.0.0.2:7860 ,", "HF_TOKEN": "hf_x", "BACKEND_RETRY_S": "3"}
    for name, value in {**environment, "BACKEND_WAKE_TIMEOUT": "40"}.items():
        monkeypatch.setenv(name, value)
    pool = load_app("public_space", fresh=True).pool_from_env()  # its constants read the environment at import
    token = {"x-hf-authorization": "Bearer hf_x"}
    got = [(one.target, one._headers, one.retry_after, one.wake_timeout) for one in pool.backends]
    assert got == [("me/gpu-1", token, 3.0, 40.0), ("http://10.0.0.2:7860", token, 3.0, 40.0)]


def test_stop_cancels_only_that_visitors_job_on_the_backend_that_holds_it(private_app, public_app):
    with (
        backend(private_app, 0.2) as (a_url, a, _),
        backend(private_app, 0.2) as (b_url, b, _),
        running(front_app(public_app, pool(a_url, b_url)), public_app.serve) as front,
    ):
        a.hold()
        b.hold()
        jobs = []
        for _ in range(6):  # one at a time, each once it is placed: two held on the GPUs, two next to them, two queued
            jobs.append(submit(visitor(front)))
            wait_until(lambda: placed(jobs[-1]), what="the job placed on a backend")
        in_line = lambda: [job for job in jobs if "in line" in latest(job)]  # noqa: E731
        waiting = lambda: {url: queued(url) for url in (a_url, b_url)}  # noqa: E731
        wait_until(lambda: a.inside == b.inside == 1, what="a job held on each backend's GPU")
        wait_until(lambda: len(in_line()) == sum(waiting().values()) > 0, what="the visitors in line as queued")
        before = waiting()
        leaver = in_line()[0]
        leaver.cancel()
        left = lambda: sum(waiting().values()) == sum(before.values()) - 1  # noqa: E731
        wait_until(left, what="the leaver out of its queue while the jobs ahead are held")
        after = waiting()
        assert sorted(before[url] - after[url] for url in before) == [0, 1]  # one backend's queue; the other's stays
        a.release_all()
        b.release_all()
        outcomes = [outcome(job) for job in jobs if job is not leaver]
    assert outcomes == ["Done"] * 5
    assert jobs_run(a) + jobs_run(b) == 5  # the leaver's job never ran, on either backend


def placed(job) -> bool:
    """The backend has the job: its visitor is told a place in its queue or that work on it began."""
    return any(words in latest(job) for words in ("in line", "Working on your photo"))


def test_a_backend_whose_jobs_are_past_their_announced_time_still_counts_them():
    """A stalled backend (its jobs overdue) must not look idle, or it would draw every new job."""
    now = 1000.0
    stalled, idle, busy = Figures(), Figures(), Figures()
    for figures in (stalled, idle, busy):
        figures.service = 0.5
    stalled.jobs = {f"s{i}": SentJob(session=f"s{i}", due=now - 5.0) for i in range(3)}  # held: 5 s overdue
    busy.jobs = {"b": SentJob(session="b", due=now + 0.4)}  # one job, on time
    assert idle.expected_finish(now, 1.0) == 0.5
    assert busy.expected_finish(now, 1.0) == pytest.approx(0.9)
    assert stalled.expected_finish(now, 1.0) == 2.0  # one gap for each of its three jobs and one for the new one
