"""The maintainer's /metrics on both apps: exact counts after known sequences, and only for the token.

Each sequence's jobs are held where it needs them with the stand-in's latch, and every counter of both apps is
compared whole (`jobs`, `now`, `per_backend`), so a count that moved where it should not fails the test too.
"""

from __future__ import annotations

import base64

import httpx
import pytest
from conftest import (
    API,
    EXAMPLE_PHOTO,
    TLS,
    TOKEN,
    backend,
    free_port,
    front_app,
    kill,
    outcome,
    pool,
    queued,
    running,
    stack,
    visitor,
    wait_until,
)
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from prometheus_client.parser import text_string_to_metric_families

import front_metrics
from relay import BUSY

METRICS_TOKEN = "metrics-test-token-7c2e"
COUNTING = {"metrics_token": METRICS_TOKEN}  # the public app counts only with a metrics token
JOB_FAILED = "Something went wrong while processing the photo."  # the backend's sentence for a failed job


def scrape(url: str, token: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{url}metrics", headers={"authorization": f"Bearer {token}"}, verify=TLS)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def jobs(figures: dict) -> dict[str, float]:
    """Every job counter: {"done": 3, "refused rate": 1, ...} (the outcome, then the reason if it has one)."""
    return {
        " ".join(filter(None, (labels["outcome"], labels["reason"]))): value
        for (name, pairs), value in figures.items()
        if name == "backdrop_jobs_total" and (labels := dict(pairs))
    }


def now(figures: dict) -> dict[str, float]:
    """Jobs waiting and running now, and how many waits and runs the histograms timed."""
    return {
        "waiting": figures[("backdrop_jobs_waiting", ())],
        "running": figures[("backdrop_jobs_running", ())],
        "waits timed": figures[("backdrop_wait_seconds_count", ())],
        "runs timed": figures[("backdrop_run_seconds_count", ())],
    }


def placed(back: str) -> float:
    """Jobs the backend holds, as its own figures say: those in a slot and those in its queue."""
    figures = now(scrape(back, TOKEN))
    return figures["running"] + figures["waiting"]


def per_backend(figures: dict) -> dict[str, dict[str, float]]:
    """The front's figures for each backend, by label: up, jobs sent, jobs moved to another."""
    names = {"up": "backdrop_backend_up", "sent": "backdrop_backend_jobs_sent_total"}
    names["moved"] = "backdrop_backend_jobs_moved_total"
    labels = sorted({dict(pairs)["backend"] for (name, pairs) in figures if name == names["up"]})
    return {label: {key: figures[(name, (("backend", label),))] for key, name in names.items()} for label in labels}


def front_jobs(**counts: float) -> dict[str, float]:
    """The front's job counters: these, and 0 for every other outcome and reason."""
    outcomes = [*front_metrics.OUTCOMES, *(f"refused {reason}" for reason in front_metrics.REFUSALS)]
    return {outcome: counts.get(outcome.replace(" ", "_"), 0) for outcome in outcomes}


def back_jobs(**counts: float) -> dict[str, float]:
    """The backend's job counters: these, and 0 for every other outcome and reason."""
    outcomes = ["done", "failed", "cancelled", "refused bad_input", "refused queue_full", "refused gpu_quota"]
    return {outcome: counts.get(outcome.replace(" ", "_"), 0) for outcome in outcomes}


def submit(client, category: str = "casual"):
    return client.submit(handle_file(str(EXAMPLE_PHOTO)), category, "female", api_name=API)


def done(job) -> bool:
    return job.result(timeout=60)[2].startswith("Done")


def painting(job) -> bool:
    """Its visitor was told that work on the picture began (the front will not send it elsewhere)."""
    return any("Painting the backdrop" in output[2] for output in job.outputs())


def test_every_counter_is_exact_after_a_known_sequence(private_app, public_app, rate_clock):
    fair = {"max_jobs_per_visitor": 1, "visitor_rate": "4/minute"}
    with stack(private_app, public_app, front={**fair, **COUNTING}) as s:
        you = visitor(s.front)
        assert done(submit(you))  # done 1 (rate: 1 of 4)
        assert "Unknown category" in outcome(submit(you, "nope"))  # bad input, before the fair share
        s.standin.hold()
        held = submit(you)  # rate: 2 of 4
        s.standin.wait_inside(1)
        wait_until(lambda: now(scrape(s.front, METRICS_TOKEN))["running"] == 1)  # the front heard it start
        assert "in line" in outcome(submit(you))  # fair share: one job at once
        held.cancel()
        wait_until(lambda: jobs(scrape(s.front, METRICS_TOKEN))["cancelled"] == 1)
        s.standin.release_all()
        wait_until(lambda: jobs(scrape(s.back, TOKEN))["cancelled"] == 1)
        for _ in range(2):  # rate: 3 and 4 of 4
            assert done(submit(you))
        assert "too many photos" in outcome(submit(you))  # rate
        front, back = scrape(s.front, METRICS_TOKEN), scrape(s.back, TOKEN)
    assert jobs(front) == front_jobs(done=3, cancelled=1, refused_fair_share=1, refused_rate=1, refused_bad_input=1)
    # Waits: the three done and the cancelled one started; runs: the three done.
    assert now(front) == {"waiting": 0, "running": 0, "waits timed": 4, "runs timed": 3}
    assert per_backend(front) == {"backend 1 of 1": {"up": 1, "sent": 4, "moved": 0}}
    assert jobs(back) == back_jobs(done=4, cancelled=1)  # the warm-up and the three; the front refused the rest
    assert now(back) == {"waiting": 0, "running": 0, "waits timed": 5, "runs timed": 4}


def test_a_failed_job_a_full_queue_and_bad_input_sent_to_the_backend_are_counted_exactly(private_app, public_app):
    with stack(private_app, public_app, front=COUNTING, queue_max_size=1) as s:
        s.standin.fail_next()
        assert JOB_FAILED in outcome(submit(visitor(s.front)))  # failed on the backend's GPU
        s.standin.hold()
        held = [submit(visitor(s.front))]  # on the GPU
        s.standin.wait_inside(1)
        held.append(submit(visitor(s.front)))  # in the second slot, waiting for the GPU
        wait_until(lambda: now(scrape(s.back, TOKEN))["running"] == 2)
        held.append(submit(visitor(s.front)))  # the one place in the backend's queue
        wait_until(lambda: queued(s.back) == 1)
        assert outcome(submit(visitor(s.front))) == BUSY  # queue full
        s.standin.release_all()
        assert all(done(job) for job in held)
        # Straight to the backend: inputs the front would refuse.
        direct = Client(s.back, token=TOKEN, verbose=False, download_files=False, ssl_verify=TLS)
        photo = base64.b64encode(EXAMPLE_PHOTO.read_bytes()).decode()
        for image_b64, category in ((base64.b64encode(b"not a photo").decode(), "casual"), (photo, "nope")):
            with pytest.raises(AppError):
                direct.predict(image_b64, category, "female", api_name=API)
        front, back = scrape(s.front, METRICS_TOKEN), scrape(s.back, TOKEN)
    assert jobs(front) == front_jobs(done=3, failed=1, refused_queue_full=1)
    assert now(front) == {"waiting": 0, "running": 0, "waits timed": 4, "runs timed": 3}  # the failed one started
    assert per_backend(front) == {"backend 1 of 1": {"up": 1, "sent": 4, "moved": 0}}  # the refused one never joined
    assert jobs(back) == back_jobs(done=4, failed=1, refused_queue_full=1, refused_bad_input=2)
    # Waits for the GPU: the warm-up, the failed job and the three; bad input never got that far.
    assert now(back) == {"waiting": 0, "running": 0, "waits timed": 5, "runs timed": 4}


def test_zerogpus_refusals_are_counted_as_refused_for_gpu_quota_not_failed(private_app):
    with backend(private_app, 0.0) as back:  # warmed up: one job done
        back.standin.refuse_gpu_next()  # "ZeroGPU quota exceeded"
        back.standin.refuse_gpu_next("ZeroGPU queue timeout", "No GPU was available after 60s", html="<b>No GPU</b>")
        back.standin.fail_next()
        direct = Client(back.url, token=TOKEN, verbose=False, download_files=False, ssl_verify=TLS)
        photo = base64.b64encode(EXAMPLE_PHOTO.read_bytes()).decode()
        for sentence in ("Try again in 0:14:02", "No GPU was available after 60s", JOB_FAILED):
            with pytest.raises(AppError, match=sentence):
                direct.predict(photo, "casual", "female", api_name=API)
        assert direct.predict(photo, "casual", "female", api_name=API)[3].startswith("Done")
        figures = scrape(back.url, TOKEN)
    assert jobs(figures) == back_jobs(done=2, failed=1, refused_gpu_quota=2)
    # Every job that made its GPU call had its wait timed: the warm-up, the two refused, the failed one and the last.
    assert now(figures) == {"waiting": 0, "running": 0, "waits timed": 5, "runs timed": 2}


def test_a_killed_backends_jobs_are_all_sent_again_and_counted_by_what_they_did(private_app, public_app):
    other_port = free_port()
    with backend(private_app, 0.0) as (dying_url, dying_standin, dying):
        backends = pool(dying_url, f"http://127.0.0.1:{other_port}/", retry_after=0.2)
        dying_standin.hold()
        with running(front_app(public_app, backends, **COUNTING), public_app.serve) as front:
            sent = [submit(visitor(front)) for _ in range(3)]  # nothing listens at the other yet: all go here
            wait_until(lambda: dying_standin.inside == 1 and placed(dying_url) == 3)  # on its GPU, beside, queued
            wait_until(lambda: any(painting(job) for job in sent))  # the front heard that work on it began
            with backend(private_app, 0.0, port=other_port) as (other_url, _, _):
                wait_until(lambda: not backends.backends[1].down)  # probed in the background: it takes jobs
                assert done(submit(visitor(front)))  # the idle one takes the next job
                before = scrape(dying_url, TOKEN)
                kill(dying)  # its job on the GPU is held
                outcomes = [outcome(job) for job in sent]
                figures, back = scrape(front, METRICS_TOKEN), scrape(other_url, TOKEN)
    assert outcomes == ["Done"] * 3
    assert jobs(before) == back_jobs(done=1)  # the dying backend, before it died: its warm-up
    assert now(before) == {"waiting": 1, "running": 2, "waits timed": 2, "runs timed": 1}
    assert jobs(figures) == front_jobs(done=4)
    # Each job's wait was timed once: the two that started on the dying backend, the one moved, the other's own.
    assert now(figures) == {"waiting": 0, "running": 0, "waits timed": 4, "runs timed": 4}
    assert resent(figures) == {"waiting": 2, "running": 1}  # the one on its GPU, and the two beside and queued
    assert per_backend(figures) == {
        "backend 1 of 2": {"up": 0, "sent": 3, "moved": 3},  # every job it had went on
        "backend 2 of 2": {"up": 1, "sent": 4, "moved": 0},  # its own and the three moved
    }
    assert jobs(back) == back_jobs(done=5)  # the other backend: its warm-up, its own and the three moved
    assert now(back) == {"waiting": 0, "running": 0, "waits timed": 5, "runs timed": 5}


def resent(figures: dict) -> dict[str, float]:
    """Jobs the front sent again when their backend went away, by what they did there."""
    return {after: figures[("backdrop_jobs_resent_total", (("after", after),))] for after in ("waiting", "running")}


def test_metrics_answer_only_the_maintainers_token_and_name_no_visitor(private_app, public_app, monkeypatch):
    with stack(private_app, public_app, front=COUNTING) as s:
        assert done(submit(visitor(s.front)))
        unknown = httpx.get(f"{s.front}no-such-route")
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {TOKEN}"}):
            answer = httpx.get(f"{s.front}metrics", headers=headers)
            assert (answer.status_code, answer.text) == (unknown.status_code, unknown.text) == (404, unknown.text)
        assert httpx.post(f"{s.front}metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}).status_code != 200
        text = httpx.get(f"{s.front}metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}).text
        back_refused = httpx.get(f"{s.back}metrics")
        assert back_refused.status_code == httpx.get(f"{s.back}no-such-route").status_code == 401
        back_text = httpx.get(f"{s.back}metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
        for figures in (text, back_text):
            assert "backdrop_jobs_total" in figures
            assert "127.0.0.1" not in figures
            assert "address" not in figures
            assert s.back not in figures
    counted: list[object] = []
    monkeypatch.setattr(front_metrics.CountedJob, "__enter__", lambda job: counted.append(job) or job)
    with stack(private_app, public_app, front={"metrics_token": None}) as s:  # no metrics token
        assert done(submit(visitor(s.front)))
        assert httpx.get(f"{s.front}metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 404
    assert counted == []  # no route, and nothing counted: no job of the front cost any counting


def test_deploy_status_reads_both_apps_and_says_which_is_down(private_app, public_app, monkeypatch, capsys):
    import deploy

    monkeypatch.setenv("METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("BACKEND_TOKEN", TOKEN)
    with stack(private_app, public_app, front=COUNTING) as s:
        assert done(submit(visitor(s.front)))
        # The visitor has the result a moment before the front counts the job over: wait for the count.
        wait_until(lambda: jobs(scrape(s.front, METRICS_TOKEN))["done"] == 1, what="the front to count the job done")
        capsys.readouterr()  # read stdout itself: `status` prints with the `print` it was defined with, not a patch
        assert deploy.main(["status", "--frontend", s.front, "--backend", s.back]) == 0
        screen = capsys.readouterr().out
        assert f"frontend {s.front}: up · waiting 0 · running 0" in screen
        assert "since start: done 1, failed 0, lost 0, cancelled 0, refused 0" in screen
        assert "backend 1 of 1: up · share 100 % (1 jobs)" in screen
        assert f"backend {s.back}: up" in screen
        assert "since start: done 2" in screen  # the backend's warm-up and the job
        assert "queue_full 0, gpu_quota 0)" in screen  # the backend counts ZeroGPU's refusals
        monkeypatch.setenv("BACKEND_TOKEN", "wrong")
        assert deploy.main(["status", "--frontend", s.front, "--backend", s.back]) == 1
        assert f"backend {s.back}: DOWN" in capsys.readouterr().out
