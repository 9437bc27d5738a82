"""The private Space's contract, on a real server on loopback, through the real gradio_client."""

from __future__ import annotations

import base64
import io
import itertools
import json

import gradio as gr
import httpx
import pytest
import spaces.zero.gradio
from conftest import API, EXAMPLE_PHOTO, TLS, png_b64, png_header_only, running, wait_until
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image
from standin import StandInPipeline


def client_for(url: str, token: str | bool = False) -> Client:
    return Client(url, token=token, verbose=False, download_files=False, ssl_verify=TLS)


def decode(b64: str, fmt: str = "WEBP") -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == fmt
    return image


@pytest.fixture
def standin() -> StandInPipeline:
    return StandInPipeline()


@pytest.fixture
def backend(private_app, standin):
    with running(private_app.create_app(standin), private_app.serve, warm_up=False) as url:
        yield url


def test_happy_path_returns_photo_overlay_result_and_status(backend, photo_b64):
    image, overlay, result, status = client_for(backend).predict(photo_b64, "formal", "female", api_name=API)
    assert image == photo_b64  # the photo needed no change: the caller's own bytes come back
    assert [decode(b64).size for b64 in (overlay, result)] == [(512, 512)] * 2
    assert status.startswith("Done in ")


def test_a_1024x768_response_travels_as_photos(backend):
    """Overlay and result come back as WebP, and a whole 1024×768 response stays well under a megabyte."""
    photo = Image.open(EXAMPLE_PHOTO).convert("RGB").resize((1024, 768))
    jpeg = png_b64(photo, "JPEG")
    response = client_for(backend).predict(jpeg, "casual", "male", api_name=API)
    assert response[0] == jpeg
    assert [decode(b64).size for b64 in response[1:3]] == [(1024, 768)] * 2
    assert sum(map(len, response)) <= 400_000


def test_accepts_a_data_url_and_downscales_to_max_side(private_app, standin):
    big = Image.new("RGB", (1200, 600), "white")
    demo = private_app.create_app(standin, max_side=300)
    with running(demo, private_app.serve, warm_up=False) as url:
        image, *_ = client_for(url).predict("data:image/png;base64," + png_b64(big), "casual", "male", api_name=API)
    assert decode(image).size == (300, 150)  # changed, so encoded again


def test_a_photo_that_must_change_comes_back_as_the_photo_the_models_saw(backend, standin):
    grey = png_b64(Image.new("L", (320, 200), 128), "JPEG")
    image, *_ = client_for(backend).predict(grey, "casual", "male", api_name=API)
    assert decode(image).mode == "RGB"
    assert decode(image).size == standin.sizes[0] == (320, 200)


def test_a_jpeg_the_models_saw_as_it_was_comes_back_as_sent(backend, standin):
    jpeg = png_b64(Image.new("RGB", (320, 200), "teal"), "JPEG")
    image, *_ = client_for(backend).predict(jpeg, "casual", "male", api_name=API)
    assert image == jpeg  # upright, RGB and small enough: not decoded into a new file, not re-encoded
    assert standin.sizes == [(320, 200)]


def test_prompt_comes_from_category_and_gender(backend, photo_b64, standin):
    client_for(backend).predict(photo_b64, "formal", "male", api_name=API)
    assert "formal portrait of a man" in standin.prompts[-1]


BAD_INPUTS = {
    "empty": ("", "No photo was received"),
    "not base64": ("this is not base64!", "not valid base64"),
    "not an image": (base64.b64encode(b"hello, world" * 10).decode(), "not an image"),
    "truncated": (None, "truncated or damaged"),
    "gif": (png_b64(Image.new("RGB", (8, 8)), "GIF"), "GIF images are not supported"),
    "bomb": (base64.b64encode(png_header_only(9_000, 9_000)).decode(), "9000×9000 pixels; the limit is 40 megapixels"),
    "huge bomb": (base64.b64encode(png_header_only(100_000, 100_000)).decode(), "the limit is 40 megapixels"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_photo_gets_a_sentence_and_the_server_keeps_serving(backend, photo_b64, standin, case):
    payload, sentence = BAD_INPUTS[case]
    if payload is None:
        payload = base64.b64encode(base64.b64decode(photo_b64)[:20_000]).decode()
    client = client_for(backend)
    with pytest.raises(AppError, match=sentence) as raised:
        client.predict(payload, "casual", "male", api_name=API)
    assert "Traceback" not in str(raised.value)
    assert standin.intervals == []  # refused before any model work
    assert client.predict(photo_b64, "casual", "male", api_name=API)[3].startswith("Done")


class BrokenPipeline(StandInPipeline):
    def render(self, photo, prompt, seed, progress=None):
        raise RuntimeError("CUDA out of memory in /secret/models/unet")


def test_a_failing_pipeline_gives_a_sentence_one_log_line_and_no_traceback(private_app, photo_b64, capfd, caplog):
    with running(private_app.create_app(BrokenPipeline()), private_app.serve, warm_up=False) as url:
        with pytest.raises(AppError, match="Something went wrong while processing the photo") as raised:
            client_for(url).predict(photo_b64, "casual", "male", api_name=API)
        with pytest.raises(AppError):  # and again: the server keeps serving
            client_for(url).predict(photo_b64, "casual", "male", api_name=API)
    output = capfd.readouterr()
    logged = caplog.text + output.out + output.err
    assert "Traceback" not in logged
    assert "/secret/models" not in logged + str(raised.value)
    assert "A job failed with RuntimeError." in caplog.text


QUOTA = "ZeroGPU quota exceeded"
QUOTA_SENTENCE = "You have exceeded your free ZeroGPU quota (30s requested vs. 12s left). Try again in 0:14:02."
# ZeroGPU's queue timeout, as spaces.zero.client writes it: HTML for its page, its plain text for everyone else.
TIMEOUT = "ZeroGPU queue timeout"
TIMEOUT_TEXT = (
    "No GPU was available after 60s [Create a free account](https://huggingface.co/join) to get a higher priority "
    "in ZeroGPU queues."
)
TIMEOUT_HTML = (
    'No GPU was available after 60s. <a style="white-space: nowrap" href="https://huggingface.co/join">Create a free '
    "account</a> to get a higher priority in ZeroGPU queues."
)


def completed(url: str, photo_b64: str, session: str) -> dict:
    """One job joined and followed with raw httpx: the queue's `process_completed` message as Gradio sends it."""
    config = httpx.get(f"{url}config", verify=TLS).json()
    (fn_index,) = [dep["id"] for dep in config["dependencies"] if dep["api_name"] == "predict_api"]
    body = {"data": [photo_b64, "casual", "male"], "session_hash": session, "fn_index": fn_index}
    assert httpx.post(f"{url}gradio_api/queue/join", json=body, verify=TLS).status_code == 200
    stream = httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session}, verify=TLS)
    with stream as lines:
        for line in lines.iter_lines():
            message = json.loads(line.removeprefix("data:")) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                return message
    raise AssertionError("the queue's stream ended without process_completed")


def test_a_zerogpu_refusal_reaches_the_caller_in_zerogpus_words(backend, standin, photo_b64, capfd, caplog):
    standin.refuse_gpu_next(title=QUOTA, message=QUOTA_SENTENCE)
    client = client_for(backend)
    with pytest.raises(AppError) as raised:
        client.predict(photo_b64, "casual", "male", api_name=API)
    assert (raised.value.message, raised.value.title) == (QUOTA_SENTENCE, QUOTA)
    standin.refuse_gpu_next(title=QUOTA, message=QUOTA_SENTENCE)
    message = completed(backend, photo_b64, "zerogpu-refused")
    assert message["success"] is False
    assert (message["output"]["error"], message["output"]["title"], message["title"]) == (QUOTA_SENTENCE, QUOTA, QUOTA)
    assert client.predict(photo_b64, "casual", "male", api_name=API)[3].startswith("Done")  # the next is served
    assert len(standin.intervals) == 1  # the refused jobs never reached the pipeline
    output = capfd.readouterr()
    logged = caplog.text + output.out + output.err
    assert caplog.text.count(f"ZeroGPU refused a job ({QUOTA}).") == 2
    assert "12s left" not in logged  # the visitor's quota is theirs: not in the log
    assert "Traceback" not in logged
    assert "A job failed" not in caplog.text


def test_zerogpus_html_refusal_reaches_the_caller_as_plain_text(backend, standin, photo_b64):
    standin.refuse_gpu_next(title=TIMEOUT, message=TIMEOUT_TEXT, html=TIMEOUT_HTML)
    message = completed(backend, photo_b64, "zerogpu-timeout")
    assert (message["output"]["error"], message["output"]["title"]) == (TIMEOUT_TEXT, TIMEOUT)
    standin.refuse_gpu_next(title=TIMEOUT, message=TIMEOUT_TEXT, html=TIMEOUT_HTML)
    with pytest.raises(AppError) as raised:
        client_for(backend).predict(photo_b64, "casual", "male", api_name=API)
    assert (raised.value.message, raised.value.title) == (TIMEOUT_TEXT, TIMEOUT)
    assert "<a" not in raised.value.message


@pytest.mark.parametrize(
    ("error", "passed_on"),
    [
        (spaces.zero.gradio.error(QUOTA, QUOTA_SENTENCE), True),
        (spaces.zero.gradio.error("ZeroGPU client error", "No GPU was available"), True),
        (spaces.zero.gradio.error("ZeroGPU worker error", "RuntimeError"), False),  # our models failed in the worker
        (gr.Error("CUDA out of memory in /secret/models", title="ZeroG"), False),
        (RuntimeError(QUOTA), False),
    ],
    ids=["quota", "client error", "worker error", "other gr.Error", "not a gr.Error"],
)
def test_only_zerogpus_refusals_are_passed_on(private_app, error, passed_on):
    refusal = private_app.zerogpu_refusal(error)
    if not passed_on:
        assert refusal is None
        return
    assert (refusal.message, refusal.title, refusal.print_exception) == (error.message, error.title, False)


def test_oversized_photo_is_refused_by_size(private_app, standin, photo_b64):
    demo = private_app.create_app(standin, max_upload_mb=0.1)
    with (
        running(demo, private_app.serve, warm_up=False) as url,
        pytest.raises(AppError, match=r"the limit is 0\.1 MB"),
    ):
        client_for(url).predict(photo_b64, "casual", "male", api_name=API)


@pytest.mark.parametrize(
    ("category", "gender", "sentence"),
    [
        ("beach", "male", "Unknown category 'beach'. Choose one of 'casual', 'formal'."),
        ("casual", "robot", "Unknown gender 'robot'. Choose one of 'male', 'female'."),
    ],
)
def test_unknown_choice_lists_the_valid_ones(backend, photo_b64, category, gender, sentence):
    with pytest.raises(AppError, match=sentence):
        client_for(backend).predict(photo_b64, category, gender, api_name=API)


def test_info_lists_only_predict_api(backend):
    info = httpx.get(f"{backend}gradio_api/info").json()
    assert list(info["named_endpoints"]) == [API]
    assert info["unnamed_endpoints"] == {}


def test_only_predict_api_can_be_invoked(backend, photo_b64):
    config = httpx.get(f"{backend}config").json()
    (fn_index,) = [dep["id"] for dep in config["dependencies"] if dep["api_name"] == "predict_api"]
    join = f"{backend}gradio_api/queue/join"
    body = {"data": [photo_b64, "casual", "male"], "session_hash": "s1", "fn_index": fn_index}
    assert httpx.post(join, json=body).status_code == 200
    for other in (fn_index + 1, 99, str(fn_index), None):
        assert httpx.post(join, json={**body, "fn_index": other}).status_code == 403
    for path in ("call/other", "call/v2/other", "run/other", "api/other", "call/predict_api/x/y"):
        assert httpx.post(f"{backend}gradio_api/{path}", json={"data": []}).status_code == 403, path
    assert httpx.post(f"{backend}gradio_api/component_server", json={}).status_code == 403
    upload = httpx.post(f"{backend}gradio_api/upload", files={"files": ("a.png", b"x")})
    assert upload.status_code == 403
    simple = httpx.post(f"{backend}gradio_api/call/predict_api", json={"data": [photo_b64, "casual", "male"]})
    assert simple.status_code == 200


def test_backend_token_is_enforced(private_app, standin, photo_b64):
    demo = private_app.create_app(standin)
    with running(demo, private_app.serve, token="s3cret-token", warm_up=False) as url:
        assert httpx.get(f"{url}config").status_code == 401
        assert httpx.get(f"{url}config", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}config", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        with pytest.raises(ValueError, match="credentials were not provided"):
            client_for(url, token="wrong")
        assert client_for(url, token="s3cret-token").predict(photo_b64, "casual", "male", api_name=API)[3]


def test_simultaneous_requests_never_overlap_in_the_pipeline(private_app, photo_b64):
    standin = StandInPipeline(service_time=0.2)  # long enough for the three to contend for the GPU
    with running(private_app.create_app(standin), private_app.serve, warm_up=False) as url:
        client = client_for(url)
        jobs = [client.submit(photo_b64, "casual", "male", api_name=API) for _ in range(3)]
        assert all(job.result(timeout=30)[3].startswith("Done") for job in jobs)
    assert standin.max_inside == 1
    starts_ends = sorted(standin.intervals)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(starts_ends))


def test_the_next_photo_is_decoded_while_the_gpu_works(private_app, photo_b64):
    """Gradio starts the next job while one is in the pipeline; the gate keeps it out until the GPU is free."""
    standin = StandInPipeline()
    standin.hold()
    with running(private_app.create_app(standin), private_app.serve, warm_up=False) as url:
        first = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        standin.wait_inside(1)
        second = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        wait_until(lambda: "Waiting for the GPU" in str(second.status().progress_data))  # decoded, started
        assert not standin.intervals  # the first job still holds the GPU (held there)
        assert standin.inside == 1
        standin.release_all()
        assert first.result(timeout=60)[3]
        assert second.result(timeout=60)[3]
    assert standin.max_inside == 1


def test_a_job_cancelled_while_waiting_for_the_gpu_never_runs(private_app, photo_b64):
    standin = StandInPipeline()
    standin.hold()
    with running(private_app.create_app(standin), private_app.serve, warm_up=False) as url:
        first = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        standin.wait_inside(1)
        second = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        wait_until(lambda: "Waiting for the GPU" in str(second.status().progress_data))
        second.cancel()  # returns once the server has cancelled it, the first job still held on the GPU
        standin.release_all()
        assert first.result(timeout=60)[3]
        third = client_for(url).submit(photo_b64, "formal", "male", api_name=API)
        assert third.result(timeout=60)[3]
    assert len(standin.prompts) == 2  # the first and the third: the cancelled one never reached the pipeline
    assert "formal" in standin.prompts[1]


def test_gpu_concurrency_jobs_run_together_and_never_more(private_app, photo_b64):
    standin = StandInPipeline()
    standin.hold()
    demo = private_app.create_app(standin, gpu_concurrency=2)
    with running(demo, private_app.serve, warm_up=False) as url:
        jobs = [client_for(url).submit(photo_b64, "casual", "male", api_name=API) for _ in range(6)]
        standin.wait_inside(2)
        waiting = lambda job: "Waiting for the GPU" in str(job.status().progress_data)  # noqa: E731
        wait_until(lambda: sum(map(waiting, jobs)) == 2)  # the other two slots' jobs, kept out of the pipeline
        assert standin.inside == 2
        standin.release_all()
        assert all(job.result(timeout=60)[3].startswith("Done") for job in jobs)
    assert standin.max_inside == 2


def test_finished_sessions_keep_no_inputs_or_outputs(private_app):
    """Each relayed request is a session that never comes back: Gradio must not hold on to its photos."""
    demo = private_app.create_app(StandInPipeline())
    photos = [png_b64(Image.new("RGB", (64, 64), colour), "JPEG") for colour in ("red", "green", "blue")]
    with running(demo, private_app.serve, warm_up=False) as url:
        outputs = [client_for(url).predict(photo, "casual", "male", api_name=API) for photo in photos]
        held = list(demo.blocks.state_holder.session_data.values())
    assert len(held) <= 1
    kept = repr([session.config_values for session in held])
    assert sum(output[1] in kept for output in outputs) <= 1  # the latest session's, until the next one comes


def test_queued_callers_get_their_place_and_an_eta_that_follows_the_gpu(private_app, photo_b64):
    service_time = 2.0  # the warm-up's: the GPU time the estimates are made of (long beside a busy client's lag)
    standin = StandInPipeline(service_time=service_time)
    with running(private_app.create_app(standin), private_app.serve, warm_up=True) as url:
        assert standin.intervals
        standin.hold()
        callers = [client_for(url) for _ in range(5)]
        jobs = [caller.submit(photo_b64, "casual", "male", api_name=API) for caller in callers[:2]]
        standin.wait_inside(1)  # one held on the GPU, one next to it waiting for the GPU (either may be first)
        wait_until(lambda: any("Waiting for the GPU" in str(job.status().progress_data) for job in jobs))
        for rank, caller in enumerate(callers[2:]):
            jobs.append(caller.submit(photo_b64, "casual", "male", api_name=API))
            wait_until(lambda: jobs[-1].status().eta is not None)
            status = jobs[-1].status()
            assert (status.code.name, status.rank) == ("IN_QUEUE", rank)

        def one_update() -> bool:
            """The queued callers' latest estimates came in one of the queue's updates (sent to all at once)."""
            statuses[:] = [job.status() for job in jobs[2:]]
            times = [status.time.timestamp() for status in statuses]
            return all(status.eta is not None for status in statuses) and max(times) - min(times) < 1.0

        statuses: list = []
        wait_until(one_update)
        finishes = [status.time.timestamp() + status.eta for status in statuses]  # when each was told it ends
        standin.service_time = 0.0
        standin.release_all()
        assert all(job.result(timeout=60) for job in jobs)
    steps = [later - earlier for earlier, later in itertools.pairwise(finishes)]
    assert all(0.5 * service_time < step < 1.5 * service_time for step in steps), steps  # one GPU time per place


def test_a_cancelled_running_job_never_runs_beside_the_next(private_app, photo_b64):
    """Gradio frees the slot of a cancelled job while its thread runs on; the GPU gate holds the next."""
    standin = StandInPipeline()
    standin.hold()
    with running(private_app.create_app(standin), private_app.serve, warm_up=False) as url:
        first = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        standin.wait_inside(1)  # it is running (held): cancel it now
        first.cancel()
        second = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        wait_until(lambda: "Waiting for the GPU" in str(second.status().progress_data))  # kept out ...
        assert standin.inside == 1  # ... while the cancelled job's thread is still in the pipeline
        standin.release_all()
        assert second.result(timeout=60)[3].startswith("Done")
    assert standin.max_inside == 1


def test_a_full_queue_gives_a_clear_error(private_app, photo_b64):
    standin = StandInPipeline()
    standin.hold()
    with running(private_app.create_app(standin, queue_max_size=1), private_app.serve, warm_up=False) as url:
        client = client_for(url)
        running_job = client.submit(photo_b64, "casual", "male", api_name=API)
        standin.wait_inside(1)
        next_job = client.submit(photo_b64, "casual", "male", api_name=API)  # started: decoded, waiting for the GPU
        wait_until(lambda: next_job.status().code.name == "PROGRESS")
        queued = client.submit(photo_b64, "casual", "male", api_name=API)
        wait_until(lambda: queued.status().code.name == "IN_QUEUE")
        with pytest.raises(Exception, match="Queue is full"):
            client_for(url).predict(photo_b64, "casual", "male", api_name=API)
        standin.release_all()
        assert all(job.result(timeout=60)[3] for job in (running_job, next_job, queued))


def test_warm_up_gives_the_first_visitor_an_eta(private_app, photo_b64):
    standin = StandInPipeline(service_time=0.3)
    with running(private_app.create_app(standin), private_app.serve, warm_up=True) as url:  # waits for the warm-up
        standin.hold()
        blockers = [client_for(url).submit(photo_b64, "casual", "male", api_name=API) for _ in range(2)]  # 2 slots
        standin.wait_inside(1)
        wait_until(lambda: any("Waiting for the GPU" in str(job.status().progress_data) for job in blockers))
        waiting = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        wait_until(lambda: waiting.status().code.name == "IN_QUEUE")
        eta = waiting.status().eta  # no job has finished since the warm-up: the first estimate is this one
        standin.release_all()
        assert all(job.result(timeout=60) for job in [*blockers, waiting])
    assert len(standin.intervals) == 4  # the warm-up went through the pipeline
    assert eta is not None
    assert eta > 0


def test_progress_reaches_the_caller(private_app, photo_b64):
    standin = StandInPipeline()
    standin.hold(every_step=True)  # each step's update is sent while the job is held at that step
    with running(private_app.create_app(standin), private_app.serve, warm_up=False) as url:
        job = client_for(url).submit(photo_b64, "casual", "male", api_name=API)
        for step in (1, 2):
            wanted = f"Painting the backdrop (step {step} of 2)"
            wait_until(lambda: wanted in [p.desc for p in job.status().progress_data or []], what=wanted)  # noqa: B023
            standin.release()
        assert job.result(timeout=60)[3].startswith("Done")


@pytest.fixture(scope="module")
def tiny_backend(private_app, tiny_models):
    """The real model code (`backdrop.Backdrop`), loaded through from_pretrained from the tiny local folders."""
    from backdrop import Backdrop

    pipeline = Backdrop(
        str(tiny_models / "segmentation"), str(tiny_models / "background"), steps=2, prompts=private_app.all_prompts()
    )
    assert pipeline.pipe.text_encoder is None  # as the app loads it: every prompt encoded once, at load
    with running(private_app.create_app(pipeline), private_app.serve, warm_up=False) as url:
        yield url


def test_happy_path_on_the_real_model_code(tiny_backend, photo_b64):
    image, overlay, result, status = client_for(tiny_backend).predict(photo_b64, "casual", "male", api_name=API)
    photo = decode(image, "PNG")
    assert photo.size == decode(overlay).size == decode(result).size == (512, 512)
    assert decode(overlay).tobytes() != photo.tobytes()  # classes were tinted
    assert status.startswith("Done in ")


def test_same_inputs_give_the_same_outputs(tiny_backend, photo_b64):
    client = client_for(tiny_backend)
    first = client.predict(photo_b64, "formal", "female", api_name=API)
    second = client.predict(photo_b64, "formal", "female", api_name=API)
    other = client.predict(photo_b64, "casual", "female", api_name=API)
    assert first[:3] == second[:3]
    assert other[2] != first[2]  # another prompt and seed paint another backdrop


def test_the_api_page_lists_the_valid_choices(backend):
    parameters = httpx.get(f"{backend}gradio_api/info").json()["named_endpoints"][API]["parameters"]
    assert [p["type"].get("enum") for p in parameters] == [None, ["casual", "formal"], ["male", "female"]]
