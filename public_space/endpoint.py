"""The public app's one endpoint, `predict_api`: one visitor's request, step by step.

1. `check_request`: the inputs (a photo, known choices) and a configured backend;
2. `Callers.visitor_of`: who is asking: an account (signed in, or a token) or an address (visitors.py);
3. `FairShare.slot`: their fair share, held until the job ends however it ends;
4. `Files.using`: their own upload, kept on disk meanwhile (files.py);
5. `PhotoReader.photo`: the photo as the backend takes it, read a few at a time (photos.py);
6. `Results.answer`: a kept result for a repeat (results.py); else
7. `WaitLine.admit`: the line's promise, a photo that would wait too long refused at once (waiting.py), before
   its photo is read when no kept result could answer it;
8. `FairShare.spend`: one of their photos for the window;
9. `Backends.predict`: the job on the best backend, sent again if that one goes away (pool.py);
10. `status_lines`: what the visitor sees meanwhile, paced (pacing.py, wording.py), then the pictures, saved where
    Gradio serves them.

A refusal or failure ends the run with its sentence: on the page in the status line (the pictures stay), for any
other caller as an error (gradio_client's AppError).
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import ImageData

from choices import unknown_choice
from files import Files
from front_metrics import FrontMetrics, JobCount, NoMetrics
from pacing import Pacer, Tail, ticking
from photos import UPLOAD_AGAIN, PhotoReader, picture_suffix
from pool import Backends
from relay import Finished, GpuRefused, Running, Unavailable, Update
from results import Results
from visitors import ACCOUNT, Callers, FairShare
from waiting import WaitLine
from wording import describe, sentence_of

NOT_CONFIGURED = "The service is not configured yet. Please try again later."
NO_PHOTO = "Please upload a photo first."
OWN_GPU_QUOTA = "Sign in with Hugging Face for a GPU quota of your own."
TICK_S = 1.0  # the countdown's step, and how soon a visitor who left is noticed

Outputs = tuple[Any, Any, str]  # overlay, result (as Gradio sends files; or "keep as it is"), status line


@dataclass
class Relay:
    """What the endpoint works with: the app's parts, each built once by `create_app`."""

    pool: Backends | None  # None when no backend is configured
    callers: Callers
    files: Files
    fair_share: FairShare
    results: Results
    photos: PhotoReader
    wait_line: WaitLine
    metrics: FrontMetrics | NoMetrics
    sign_in: bool  # the page has "Sign in with Hugging Face"
    tail: Tail = field(default_factory=Tail)  # the front's own time per job after the backend's result


def relay_endpoint(relay: Relay) -> Callable[..., AsyncIterator[Outputs]]:
    """The endpoint Gradio serves as `predict_api`."""

    async def predict_api(
        image: dict[str, Any] | None, category: str, gender: str, request: gr.Request
    ) -> AsyncIterator[Outputs]:
        """Segment the person in the photo and composite them onto a generated backdrop, streaming the status."""
        on_page = request.headers.get("x-gradio-user") == "app"  # what Gradio's own page sends with each run
        keep = gr.skip() if on_page else None  # the page keeps its pictures until new ones come
        with relay.metrics.job() as counted:  # counted from here until it ends, however it ends (front_metrics.py)
            try:
                outputs = run(relay, image, category, gender, request, on_page=on_page, counted=counted)
                async with contextlib.aclosing(outputs):
                    async for each in outputs:
                        yield each
                return
            except Exception as error:  # not BaseException: a cancel (Stop, a visitor gone) ends the run as it is
                counted.ended_by(error)
                sentence = sentence_of(error)
        if not on_page:
            raise gr.Error(sentence, print_exception=False)
        yield keep, keep, sentence

    return predict_api


async def run(
    relay: Relay,
    image: dict[str, Any] | None,
    category: str,
    gender: str,
    request: gr.Request,
    *,
    on_page: bool,
    counted: JobCount,
) -> AsyncIterator[Outputs]:
    """The request's steps (see the module's docstring)."""
    pool = check_request(relay.pool, image, category, gender)
    visitor = await relay.callers.visitor_of(request)
    with relay.fair_share.slot(visitor, on_page=on_page), relay.files.using(image["path"], visitor) as upload:
        if upload is None:
            raise gr.Error(relay.files.refusal(visitor) or UPLOAD_AGAIN, print_exception=False)
        if not relay.results.may_answer(visitor):  # no repeat to answer: the line's promise, before the photo is read
            relay.wait_line.admit()
        photo = await relay.photos.photo(upload)
        key = relay.results.key(photo.digest, category, gender, visitor)
        kept = await relay.results.answer(pool, key)
        if kept is None:
            relay.wait_line.admit()
        relay.fair_share.spend(visitor, on_page=on_page)
        if kept is None:
            updates = relay.results.keeping(key, pool.predict(photo, category, gender, headers=forwarded(request)))
        else:
            updates = answered(kept)
        try:
            async for outputs in status_lines(updates, relay, keep=gr.skip() if on_page else None, counted=counted):
                yield outputs
        except GpuRefused as refused:  # ZeroGPU's own words; on the page, with how an anonymous visitor gets more
            if on_page and relay.sign_in and not visitor.startswith(ACCOUNT):
                raise GpuRefused(f"{refused} {OWN_GPU_QUOTA}") from None
            raise


async def answered(kept: Finished) -> AsyncIterator[Update]:
    """A kept result, as the one update of a job that needs no backend."""
    yield kept


def forwarded(request: gr.Request) -> dict[str, str]:
    """The visitor's own headers that go with their job, and no one else's: their ZeroGPU token (ZeroGPU charges
    and ranks the GPU work by it), and whether they use the page (ZeroGPU words its refusals for a page or an API
    caller by it)."""
    headers = {name: value for name in ("x-ip-token",) if (value := request.headers.get(name))}
    if request.headers.get("x-gradio-user") == "app":
        headers["x-gradio-user"] = "app"
    return headers


def check_request(pool: Backends | None, image: dict[str, Any] | None, category: str, gender: str) -> Backends:
    """The pool to relay to; or Unavailable when there is none, gr.Error when the input cannot be relayed."""
    if pool is None:
        raise Unavailable(NOT_CONFIGURED)
    if not isinstance(image, dict) or not isinstance(image.get("path"), str) or not image["path"]:
        raise gr.Error(NO_PHOTO, print_exception=False)
    if unknown := unknown_choice(category, gender):
        raise gr.Error(unknown, print_exception=False)
    return pool


async def status_lines(
    updates: AsyncIterator[Update], relay: Relay, *, keep: Any, counted: JobCount
) -> AsyncIterator[Outputs]:
    """The job's moments as the visitor's status line (paced: pacing.py), then its pictures."""
    pacer, progress = Pacer(TICK_S), gr.Progress()
    async with contextlib.aclosing(ticking(updates, TICK_S)) as stream:
        async for update in stream:
            now = time.monotonic()
            if isinstance(update, Running):
                counted.run()  # the backend started it (counted once, whenever the visitor is told)
            if not pacer.arrived(update, now):
                continue
            latest = pacer.latest
            if isinstance(latest, Running) and latest.fraction is not None:
                progress(latest.fraction, desc=latest.desc)
            if isinstance(latest, Finished):
                counted.done()  # before the last yield: a visitor may leave there
                yield save_pictures(relay.files, latest)
                relay.tail.add(time.monotonic() - now)  # Gradio has copied, and sent, the pictures
                return
            if not pacer.repeats(line := describe(latest, now, relay.tail.seconds)):
                yield keep, keep, line


def save_pictures(files: Files, finished: Finished) -> Outputs:
    """Keep the finished job's pictures where Gradio serves them (files.py keeps them a while)."""
    overlay, result = (
        files.save_result(data, f"{name}-{time.monotonic_ns()}{picture_suffix(data)}")
        for name, data in (
            ("overlay", base64.b64decode(finished.overlay_b64)),
            ("result", base64.b64decode(finished.result_b64)),
        )
    )
    return picture(overlay), picture(result), finished.status


def picture(path: Path) -> dict[str, Any]:
    """An output picture as Gradio's Image postprocessing makes it from a file path (the event skips that step)."""
    return ImageData(path=str(path), orig_name=path.name).model_dump()
