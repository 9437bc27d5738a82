"""The public relay, on real servers on loopback: the private app (stand-in pipeline) behind the public one."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import httpx
import pytest
from conftest import (
    API,
    EXAMPLE_PHOTO,
    ROOT,
    TLS,
    TOKEN,
    Stack,
    free_port,
    front_app,
    kill,
    latest,
    queued,
    raw_outputs,
    running,
    stack,
    statuses,
    submit,
    visitor,
    wait_until,
)
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from standin import StandInPipeline

from pool import Backends
from relay import BUSY, UNAVAILABLE

RESTARTING = "The image service is restarting · your photo is kept"


def fill_the_gpu(s: Stack) -> list:
    """Two visitors: one held on the GPU, one decoded beside it and waiting for the GPU (the backend's two slots).

    They stay there until the test calls `s.standin.release_all()`.
    """
    s.standin.hold()
    jobs = [submit(visitor(s.front))]
    s.standin.wait_inside(1)
    jobs.append(submit(visitor(s.front)))
    wait_until(lambda: "Waiting for the GPU" in "".join(statuses(jobs[1])))
    return jobs


def seen(job, text: str) -> bool:
    return any(text in line for line in statuses(job))


def test_relay_happy_path(private_app, public_app):
    with stack(private_app, public_app) as s:
        overlay, result, status = visitor(s.front).predict(
            handle_file(str(EXAMPLE_PHOTO)), "formal", "male", api_name=API
        )
    assert status.startswith("Done in ")
    for path in (overlay, result):
        with Image.open(path) as image:
            assert (image.format, image.size, Path(path).suffix) == ("WEBP", (512, 512), ".webp")
    assert "formal portrait of a man" in s.standin.prompts[-1]


def test_a_large_photo_is_downscaled_before_it_is_sent(private_app, public_app, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 1500), "white").save(big)
    standin = StandInPipeline()
    with running(private_app.create_app(standin, max_side=4000), private_app.serve, warm_up=False) as back:
        front_demo = public_app.create_app(Backends.connect([back], None), max_side=600, delete_cache=None)
        with running(front_demo, public_app.serve) as front:
            visitor(front).predict(handle_file(str(big)), "casual", "male", api_name=API)
    assert standin.sizes == [(600, 300)]


def test_a_queued_caller_sees_its_place_an_eta_then_progress_then_results(private_app, public_app):
    with stack(private_app, public_app) as s:
        jobs = fill_the_gpu(s)
        jobs.append(submit(visitor(s.front)))
        wait_until(lambda: queued(s.back) == 1)
        jobs.append(submit(visitor(s.front)))
        wait_until(lambda: seen(jobs[3], "2nd in line"))
        # The two ahead of the queue go on. The last two then reach the GPU in the order their photos finish
        # decoding (either may be first): the first is held at its first step, and if that is not this one, it
        # goes on too, and this one is held in turn.
        s.standin.release(2)
        painting = lambda job: seen(job, "Painting the backdrop")  # noqa: E731
        wait_until(lambda: painting(jobs[2]) or painting(jobs[3]), what=lambda: f"a held job ({diagnosis(s, jobs)})")
        if not painting(jobs[3]):
            s.standin.release(1)
        wait_until(lambda: painting(jobs[3]), what=lambda: f"'Painting the backdrop' ({diagnosis(s, jobs)})")
        s.standin.release_all()
        overlay, result, status = jobs[3].result(timeout=60)
        seen_lines = statuses(jobs[3])
    second = [line for line in seen_lines if line.startswith("You are 2nd in line · about ")]
    assert second, seen_lines
    working = [i for i, line in enumerate(seen_lines) if line.startswith("Working on your photo")]
    assert working
    assert seen_lines.index(second[0]) < working[0]
    assert any("Painting the backdrop" in line for line in seen_lines)
    assert status.startswith("Done in ")
    assert overlay
    assert result


def diagnosis(s: Stack, jobs: list) -> str:
    """How things stand, for a failed wait: the stand-in's jobs, the backend's queue, each visitor's last line."""
    lines = [statuses(job)[-1:] for job in jobs]
    return f"inside {s.standin.inside}, entered {s.standin.entered}, queued {queued(s.back)}, last lines {lines}"


def test_countdown_is_smooth_between_backend_updates(private_app, public_app):
    """While nothing moves in the backend queue, the visitor's wait counts down each tick instead of standing still."""

    def waits() -> list[float]:
        return [float(line.split("about ")[1].split(" s")[0]) for line in statuses(waiting) if "about" in line]

    with stack(private_app, public_app, service_time=2.0) as s:  # the warm-up's 2 s make a wait of several s
        ahead = fill_the_gpu(s)
        waiting = submit(visitor(s.front))
        wait_until(lambda: len(waits()) >= 3)  # three ticks, the jobs ahead held all along
        counted = waits()
        s.standin.service_time = 0.0
        s.standin.release_all()
        assert all(job.result(timeout=60) for job in [*ahead, waiting])
    assert counted == sorted(counted, reverse=True), counted
    assert counted[0] > counted[-1], counted


def test_cancelling_a_queued_visitor_touches_no_one_else(private_app, public_app):
    with stack(private_app, public_app) as s:
        ahead = fill_the_gpu(s)
        second = submit(visitor(s.front))
        wait_until(lambda: queued(s.back) == 1)
        third = submit(visitor(s.front), category="formal")
        wait_until(lambda: queued(s.back) == 2)
        third.cancel()
        wait_until(lambda: queued(s.back) == 1)  # the third left the backend queue while the jobs ahead were held
        s.standin.release_all()
        assert all(job.result(timeout=60)[2].startswith("Done") for job in [*ahead, second])
        assert submit(visitor(s.front)).result(timeout=60)[2].startswith("Done")  # queued after the third was
    assert len(s.standin.intervals) == 1 + 4  # warm-up, the two ahead, second, the last: the third never ran
    assert not any("formal" in prompt for prompt in s.standin.prompts)
    assert s.standin.max_inside == 1


def test_a_dropped_connection_cancels_only_that_visitors_job(private_app, public_app):
    """A visitor whose stream drops (closed tab, lost network) leaves the backend queue; the others stay."""
    with stack(private_app, public_app) as s:
        ahead = fill_the_gpu(s)  # both of the backend's slots taken: the leaver waits in its queue
        with httpx.Client(base_url=s.front) as raw:
            upload = raw.post("gradio_api/upload", files={"files": ("a.png", EXAMPLE_PHOTO.read_bytes())}).json()
            fn_index = next(
                d["id"] for d in raw.get("config").json()["dependencies"] if d["api_name"] == "predict_api"
            )
            photo = {"path": upload[0], "meta": {"_type": "gradio.FileData"}}
            body = {"data": [photo, "casual", "male"], "fn_index": fn_index, "session_hash": "leaver"}
            assert raw.post("gradio_api/queue/join", json=body).status_code == 200
            with raw.stream("GET", "gradio_api/queue/data", params={"session_hash": "leaver"}) as stream:
                for line in stream.iter_lines():
                    if "in line" in line and queued(s.back) == 1:
                        break  # the visitor is waiting in the backend queue; now they vanish
        left = time.monotonic()
        wait_until(lambda: queued(s.back) == 0)  # the leaver left it while the jobs ahead were held
        assert s.standin.inside == 1  # the job ahead on the GPU is still held: the leaver's was removed, not run
        print(f"the backend queue noticed in {time.monotonic() - left:.1f} s")
        s.standin.release_all()
        assert all(job.result(timeout=60)[2].startswith("Done") for job in ahead)
        assert submit(visitor(s.front)).result(timeout=60)[2].startswith("Done")  # joined after the leaver
    assert len(s.standin.intervals) == 1 + 3  # warm-up, the two ahead and the last: never the leaver


def test_backend_validation_sentence_is_relayed_as_it_is(private_app, public_app):
    with stack(private_app, public_app, max_megapixels=0.2) as s, pytest.raises(AppError) as raised:
        visitor(s.front).predict(handle_file(str(EXAMPLE_PHOTO)), "casual", "male", api_name=API)
    assert (
        str(raised.value) == "The photo is 512×512 pixels; the limit is 0.2 megapixels. Please send a smaller photo."
    )


def test_a_non_image_gets_a_sentence(private_app, public_app, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with stack(private_app, public_app) as s, pytest.raises(AppError, match="The upload is not an image"):
        visitor(s.front).predict(handle_file(str(text)), "casual", "male", api_name=API)


def test_a_full_backend_queue_says_busy(private_app, public_app):
    with stack(private_app, public_app, queue_max_size=1) as s:
        ahead = fill_the_gpu(s)
        queued_job = submit(visitor(s.front))
        wait_until(lambda: queued(s.back) == 1)
        with pytest.raises(AppError) as raised:
            submit(visitor(s.front)).result(timeout=60)
        assert str(raised.value) == BUSY
        s.standin.release_all()
        assert all(job.result(timeout=60)[2].startswith("Done") for job in [*ahead, queued_job])


def test_a_waking_backend_is_waited_for(private_app, public_app):
    port = free_port()
    back_url = f"http://127.0.0.1:{port}/"
    front_demo = front_app(public_app, Backends.connect([back_url], TOKEN, wake_timeout=120))  # a bound, not a wait
    with running(front_demo, public_app.serve) as front:
        job = submit(visitor(front))
        wait_until(lambda: any("Waking up the GPU" in line for line in statuses(job)))
        standin = StandInPipeline()
        back_demo = private_app.create_app(standin)
        private_app.serve(back_demo, token=TOKEN, warm_up=False, server_name="127.0.0.1", server_port=port, quiet=True)
        try:
            assert job.result(timeout=120)[2].startswith("Done")
        finally:
            kill(back_demo)


def test_an_unreachable_backend_gives_a_clear_error(public_app):
    front_demo = front_app(public_app, Backends.connect([f"http://127.0.0.1:{free_port()}/"], TOKEN, wake_timeout=1))
    with running(front_demo, public_app.serve) as front, pytest.raises(AppError) as raised:
        submit(visitor(front)).result(timeout=30)
    assert str(raised.value) == UNAVAILABLE


def test_a_running_job_outlives_its_backends_restart_and_the_visitor_is_told_meanwhile(private_app, public_app):
    port = free_port()
    pool_of_one = Backends.connect([f"http://127.0.0.1:{port}/"], TOKEN, wake_timeout=60)  # a bound, not a wait
    with running(front_app(public_app, pool_of_one), public_app.serve) as front:
        standin = StandInPipeline()
        standin.hold()
        back_demo = private_app.create_app(standin)
        private_app.serve(back_demo, token=TOKEN, warm_up=False, server_name="127.0.0.1", server_port=port, quiet=True)
        job = submit(visitor(front))
        standin.wait_inside(1)
        wait_until(lambda: "Painting the backdrop" in latest(job), what="the front to hear that work began")
        kill(back_demo)  # the job is held on the GPU: a restart under a running job
        wait_until(lambda: latest(job).startswith(RESTARTING), what=lambda: f"the restart told; last: {latest(job)}")
        standin.release_all()
        revived = StandInPipeline()
        back_again = private_app.create_app(revived)
        private_app.serve(back_again, token=TOKEN, warm_up=False, server_name="127.0.0.1", server_port=port, quiet=1)
        try:
            assert job.result(timeout=60)[2].startswith("Done in ")
        finally:
            kill(back_again)
    assert revived.entered == 1  # the new build ran it


def test_missing_configuration_is_said_on_the_page_and_in_the_log(public_app, caplog):
    with caplog.at_level("ERROR"):
        assert public_app.pool_from_env() is None
    assert "BACKEND is not set" in caplog.text
    with running(front_app(public_app, None), public_app.serve) as front:
        assert "not configured" in json.dumps(httpx.get(f"{front}config").json())
        with pytest.raises(AppError, match="The service is not configured yet"):
            submit(visitor(front)).result(timeout=30)


def test_only_predict_api_can_be_invoked_on_the_public_app(private_app, public_app):
    with stack(private_app, public_app) as s:
        info = httpx.get(f"{s.front}gradio_api/info").json()
        assert list(info["named_endpoints"]) == [API]
        assert info["unnamed_endpoints"] == {}
        config = httpx.get(f"{s.front}config").json()
        others = [dep["id"] for dep in config["dependencies"] if dep["api_name"] != "predict_api"]
        assert others  # the Stop and example buttons' events exist, and are browser-only
        for fn_index in others:
            body = {"data": [], "fn_index": fn_index, "session_hash": "x"}
            assert httpx.post(f"{s.front}gradio_api/queue/join", json=body).status_code == 403
        for path in ("call/other", "run/other", "api/other", "call/v2/other"):
            assert httpx.post(f"{s.front}gradio_api/{path}", json={"data": []}).status_code == 403


def test_zero_gpu_tokens_are_forwarded_per_visitor_and_never_stick(public_app):
    """Each visitor's own x-ip-token reaches the backend on their call only; a visitor with none sends none."""
    received: list[tuple[str, str | None]] = []

    def predict_api(image_b64: str, category: str, gender: str, request: gr.Request) -> tuple[str, str, str, str]:
        received.append((f"{category}/{gender}", request.headers.get("x-ip-token")))
        return image_b64, image_b64, image_b64, "Done"

    with gr.Blocks() as recorder:
        gr.api(predict_api, api_name="predict_api", concurrency_limit=1)
    with (
        running(recorder, lambda demo, **kw: demo.launch(prevent_thread_lock=True, **kw)) as back,
        running(front_app(public_app, Backends.connect([back], None)), public_app.serve) as front,
    ):
        jobs = [
            submit(visitor(front, {"x-ip-token": "token-of-a"}), gender="male"),
            submit(visitor(front, {"x-ip-token": "token-of-b"}), gender="female"),
        ]
        for job in jobs:
            job.result(timeout=30)
        submit(visitor(front), category="formal").result(timeout=30)
    expected = [("casual/male", "token-of-a"), ("casual/female", "token-of-b"), ("formal/female", None)]
    assert sorted(received, key=str) == sorted(expected, key=str)


def test_no_token_or_backend_address_reaches_pages_responses_or_logs(private_app, public_app, caplog, capfd):
    caplog.set_level("DEBUG")
    with stack(private_app, public_app, max_megapixels=0.2) as s:
        back_address = s.back.rstrip("/").removeprefix("http://")
        texts = [httpx.get(f"{s.front}{path}").text for path in ("", "config", "gradio_api/info")]
        client = visitor(s.front)
        with contextlib.suppress(AppError):
            client.predict(handle_file(str(EXAMPLE_PHOTO)), "casual", "male", api_name=API)
        texts.append(json.dumps(list(submit(client).outputs())))
    front_logs = [r.getMessage() for r in caplog.records if not r.name.startswith(("guard", "backdrop", "httpx"))]
    front_logs += [r.getMessage() for r in caplog.records if r.name.startswith("backdrop.relay")]
    out, err = capfd.readouterr()
    for text in [*texts, *front_logs, out, err]:
        assert TOKEN not in text
        assert "Traceback" not in text
    for text in [*texts, *front_logs]:
        assert back_address not in text


def test_the_front_keeps_the_values_of_only_as_many_sessions_as_it_serves(public_app):
    """Every visitor is a session; Gradio's default would keep 10,000 sessions' values in memory."""
    demo = front_app(public_app, None)
    with running(demo, public_app.serve):
        assert demo.blocks.state_holder.capacity == public_app.MAX_VISITORS < 10_000


def test_building_the_public_app_imports_no_torch():
    code = (
        "import sys; sys.path.insert(0, 'public_space'); import app; app.create_app(None); "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_a_zerogpu_refusal_reaches_the_visitor_in_zerogpus_words_and_the_next_one_is_served(
    private_app, public_app, hub, monkeypatch
):
    """The stand-in raises what the `spaces` package raises when ZeroGPU refuses the GPU (its own `error(...)`)."""
    hub.accounts["hf_grace_machine"] = "grace"  # the page has its sign-in button: Gradio's local mock signs in grace
    monkeypatch.setenv("HF_TOKEN", "hf_grace_machine")
    quota = "You have exceeded your free ZeroGPU quota (30s requested vs. 12s left). Try again in 0:14:02."
    with stack(private_app, public_app, front={"sign_in": True, "metrics_token": "m-5b1f"}) as s:
        s.standin.refuse_gpu_next(message=quota)
        with pytest.raises(AppError) as refused:  # a Python caller: ZeroGPU's words as they are
            submit(visitor(s.front)).result(timeout=60)
        assert submit(visitor(s.front)).result(timeout=60)[2].startswith("Done in ")  # the next one is served
        s.standin.refuse_gpu_next(message=quota)
        with httpx.Client(base_url=s.front, headers={"x-gradio-user": "app"}, verify=TLS) as page:  # as the page runs
            upload = page.post("gradio_api/upload", files={"files": (EXAMPLE_PHOTO.name, EXAMPLE_PHOTO.read_bytes())})
            on_page = raw_outputs(page, upload.json()[0])[2]  # the page: its status line, the pictures kept
        counted = httpx.get(f"{s.front}metrics", headers={"authorization": "Bearer m-5b1f"}, verify=TLS).text
    assert str(refused.value) == quota
    assert on_page == f"{quota} Sign in with Hugging Face for a GPU quota of your own."
    assert 'backdrop_jobs_total{outcome="refused",reason="gpu_quota"} 2.0' in counted
    assert 'backdrop_jobs_total{outcome="failed",reason=""} 0.0' in counted
