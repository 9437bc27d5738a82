"""The maintainer's /metrics on both apps: exact counts after a known sequence, and only for the token."""

from __future__ import annotations

import httpx
from conftest import EXAMPLE_PHOTO, TOKEN, stack, visitor, wait_until
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from prometheus_client.parser import text_string_to_metric_families

API = "/predict_api"
METRICS_TOKEN = "metrics-test-token-7c2e"


def scrape(url: str, token: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{url}metrics", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def jobs(figures: dict, outcome: str, reason: str = "") -> float:
    return figures[("backdrop_jobs_total", (("outcome", outcome), ("reason", reason)))]


def submit(client, category: str = "casual"):
    return client.submit(handle_file(str(EXAMPLE_PHOTO)), category, "female", api_name=API)


def refused(job) -> str:
    try:
        job.result(timeout=60)
    except AppError as error:
        return str(error)
    return "not refused"


def test_every_counter_is_exact_after_a_known_sequence(private_app, public_app, monkeypatch, rate_clock):
    monkeypatch.setattr(public_app, "METRICS_TOKEN", METRICS_TOKEN)
    fair = {"max_jobs_per_visitor": 1, "visitor_rate": "4/minute"}
    with stack(private_app, public_app, front=fair) as s:
        you = visitor(s.front)
        assert submit(you).result(timeout=60)[2].startswith("Done")  # done 1 (rate: 1 of 4)
        assert "Unknown category" in refused(submit(you, "nope"))  # bad input, before the fair share
        s.standin.hold()
        held = submit(you)  # rate: 2 of 4
        s.standin.wait_inside(1)
        assert "in line" in refused(submit(you))  # fair share: one job at once
        held.cancel()
        wait_until(lambda: jobs(scrape(s.front, METRICS_TOKEN), "cancelled") == 1)
        s.standin.release_all()
        wait_until(lambda: jobs(scrape(s.back, TOKEN), "cancelled") == 1)
        for _ in range(2):  # rate: 3 and 4 of 4
            assert submit(you).result(timeout=60)[2].startswith("Done")
        assert "too many photos" in refused(submit(you))  # rate
        front, back = scrape(s.front, METRICS_TOKEN), scrape(s.back, TOKEN)
    assert {o: jobs(front, o) for o in ("done", "failed", "cancelled", "lost")} == {
        "done": 3,
        "failed": 0,
        "cancelled": 1,
        "lost": 0,
    }
    assert {r: jobs(front, "refused", r) for r in ("fair_share", "rate", "bad_input", "queue_full")} == {
        "fair_share": 1,
        "rate": 1,
        "bad_input": 1,
        "queue_full": 0,
    }
    assert front[("backdrop_jobs_waiting", ())] == front[("backdrop_jobs_running", ())] == 0
    assert front[("backdrop_wait_seconds_count", ())] == 4  # the three done and the cancelled one started
    assert front[("backdrop_run_seconds_count", ())] == 3
    label = (("backend", "backend 1 of 1"),)
    assert front[("backdrop_backend_up", label)] == 1
    assert front[("backdrop_backend_jobs_sent_total", label)] == 4
    assert front[("backdrop_backend_jobs_moved_total", label)] == 0
    assert jobs(back, "done") == 4  # the warm-up and the three
    assert jobs(back, "cancelled") == 1
    assert back[("backdrop_jobs_running", ())] == 0
    assert back[("backdrop_run_seconds_count", ())] == 4


def test_metrics_answer_only_the_maintainers_token_and_name_no_visitor(private_app, public_app, monkeypatch):
    monkeypatch.setattr(public_app, "METRICS_TOKEN", METRICS_TOKEN)
    with stack(private_app, public_app) as s:
        assert submit(visitor(s.front)).result(timeout=60)[2].startswith("Done")
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
    monkeypatch.setattr(public_app, "METRICS_TOKEN", None)
    with stack(private_app, public_app) as s:
        assert httpx.get(f"{s.front}metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 404


def test_deploy_status_reads_both_apps_and_says_which_is_down(private_app, public_app, monkeypatch):
    import deploy

    monkeypatch.setattr(public_app, "METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("BACKEND_TOKEN", TOKEN)
    printed: list[str] = []
    monkeypatch.setattr("builtins.print", lambda text="", **_: printed.append(str(text)))
    with stack(private_app, public_app) as s:
        assert submit(visitor(s.front)).result(timeout=60)[2].startswith("Done")
        assert deploy.main(["status", "--frontend", s.front, "--backend", s.back]) == 0
        screen = "\n".join(printed)
        assert f"frontend {s.front}: up · waiting 0 · running 0" in screen
        assert "since start: done 1, failed 0, lost 0, cancelled 0, refused 0" in screen
        assert "backend 1 of 1: up · share 100 % (1 jobs)" in screen
        assert f"backend {s.back}: up" in screen
        assert "since start: done 2" in screen  # the backend's warm-up and the job
        monkeypatch.setenv("BACKEND_TOKEN", "wrong")
        printed.clear()
        assert deploy.main(["status", "--frontend", s.front, "--backend", s.back]) == 1
        assert f"backend {s.back}: DOWN" in "\n".join(printed)
