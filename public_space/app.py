"""Backdrop's public Space: a thin relay that shows each visitor their live place, wait and progress in the GPU queue.

It holds no model: each request runs on the private Space (`BACKEND`) as that visitor's own job.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import io
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import ImageData
from PIL import Image, ImageOps
from starlette.middleware import Middleware

from backends import RETRY_DOWN_S, Backends
from files import EXAMPLE_ROUTE, Files, FilesMiddleware
from front_metrics import FrontMetrics, Job, NoMetrics
from guard import GET, POST, UPLOAD, Allowed, launch_guarded
from pacing import Pacer, Tail, ticking
from photo_rules import PhotoError, load_photo, open_photo
from relay import FAILED, Finished, Queued, RelayError, Running, Unavailable, Update, Waking
from results import Results
from sign_in import SIGN_IN_ROUTES, available, sign_in_button
from visitors import FairShare, TurnedAway, visitor_of
from waiting import WAIT_ROUTE, WaitMiddleware, line_now, poll_js

BACKEND = [target.strip() for target in os.getenv("BACKEND", "").split(",") if target.strip()]  # Space ids or URLs
BACKEND_RETRY_S = float(os.getenv("BACKEND_RETRY_S", RETRY_DOWN_S))  # a failed backend is probed again after this
HF_TOKEN = os.getenv("HF_TOKEN") or None
BACKEND_WAKE_TIMEOUT = float(os.getenv("BACKEND_WAKE_TIMEOUT", "180"))
MAX_SIDE = int(os.getenv("MAX_SIDE", "1024"))  # the backend's own limit: larger photos are downscaled here first
MAX_UPLOAD_MB = float(os.getenv("MAX_UPLOAD_MB", "10"))  # the backend's own limit: larger files are re-encoded here
MAX_MEGAPIXELS = float(os.getenv("MAX_MEGAPIXELS", "40"))  # the backend's own limit: larger photos are refused here
MAX_VISITORS = int(os.getenv("MAX_VISITORS", "256"))  # requests relayed at once (each waits in the backend queue)
MAX_JOBS_PER_VISITOR = int(os.getenv("MAX_JOBS_PER_VISITOR", "2"))  # waiting or running at once; 0: no limit
VISITOR_RATE = os.getenv("VISITOR_RATE", "6/minute").strip()  # photos per visitor ("20/hour"…); empty: no limit
TRUSTED_PROXY_HOPS = int(os.getenv("TRUSTED_PROXY_HOPS", "1"))  # proxies that append X-Forwarded-For; 0: none
METRICS_TOKEN = os.getenv("METRICS_TOKEN") or None  # the maintainer's token for /metrics; unset: no such route
KEEP_FILES_S = float(os.getenv("KEEP_FILES_S", "600"))  # uploads and results stay this long after their last use
FILES_QUOTA_MB = float(os.getenv("FILES_QUOTA_MB", "2048"))  # all kept files; past it the least recently used go
VISITOR_FILES_MB = float(os.getenv("VISITOR_FILES_MB", "100"))  # one visitor's kept uploads; past it: refused
RESULT_CACHE_ENTRIES = int(os.getenv("RESULT_CACHE_ENTRIES", "256"))  # finished results kept for repeats; 0: none
RESULT_CACHE_MB = float(os.getenv("RESULT_CACHE_MB", "64"))  # and at most this many megabytes of their pictures
DECODES_AT_ONCE = 2  # photos being decoded to be downscaled: each can take up to 4 bytes per pixel
API_NAME = "predict_api"
CATEGORIES = ("casual", "formal")
GENDERS = ("male", "female")
EXAMPLE_PHOTO = Path(__file__).parent / "examples" / "astronaut.png"
TICK_S = 1.0  # the countdown's step, and how soon a visitor who left is noticed

NOT_CONFIGURED = "The service is not configured yet. Please try again later."
NO_PHOTO = "Please upload a photo first."
UPLOAD_AGAIN = "Please upload your photo again: it is no longer on the server."

logger = logging.getLogger("backdrop")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def about(seconds: float) -> str:
    """A wait in words: to the tenth of a second below 10 s (a short job is often under one), then coarser, but
    never by more than about 5 % (whole minutes would turn 90 s into "2 min")."""
    if seconds < 9.95:
        return f"about {max(0.1, seconds):.1f} s"
    if seconds < 89.5:
        return f"about {round(seconds)} s"
    if seconds < 595:
        minutes, rest = divmod(round(seconds / 10) * 10, 60)
        return f"about {minutes} min {rest} s" if rest else f"about {minutes} min"
    return f"about {round(seconds / 60)} min"


def describe(update: Update | None, now: float, tail: float = 0.0) -> str:
    """The status line for an update (None: nothing heard yet); a queue estimate counts down from when it arrived,
    and `tail` (the front's own seconds after the backend's result, pacing.Tail) is added to it."""
    if update is None:
        return "Sending your photo…"
    if isinstance(update, Waking):
        return "Waking up the GPU… this can take a minute."
    if isinstance(update, Queued):
        place = "next in line" if update.rank == 0 else f"{ordinal(update.rank + 1)} in line"
        wait = "" if update.eta is None else f" · {about(update.eta + tail - (now - update.received))}"
        return f"You are {place}{wait}"
    if isinstance(update, Running):
        return f"Working on your photo · {update.desc}" if update.desc else "Working on your photo…"
    return update.status


def photo_bytes(path: Path, max_side: int, max_pixels: int, max_bytes: int = int(MAX_UPLOAD_MB * 2**20)) -> bytes:
    """The upload as it is when the backend can take it, else upright, flattened and downscaled (JPEG).

    It is refused from its header as the backend would refuse it, in the backend's words (photo_rules.py). The
    backend applies EXIF orientation itself, so only a photo that must be downscaled is decoded here, and a large
    JPEG at a fraction of its size. Any other failure is a sentence too, and one log line without the path.
    """
    try:
        with path.open("rb") as source, open_photo(source, max_pixels=max_pixels) as photo:
            if max(photo.size) <= max_side and path.stat().st_size <= max_bytes:
                source.seek(0)
                return source.read()
            image = load_photo(photo, max_side)
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode != "RGB":  # transparency goes over white once small; palettes would resize poorly
                image = image.convert("RGBA" if image.has_transparency_data else "RGB")
            image.thumbnail((max_side, max_side), Image.LANCZOS)  # in place: no full-size copy is ever made
        flat = image if image.mode == "RGB" else Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        buffer = io.BytesIO()
        flat.convert("RGB").save(buffer, format="JPEG", quality=92)
        return buffer.getvalue()
    except PhotoError as error:
        raise gr.Error(str(error), print_exception=False) from None
    except FileNotFoundError:  # removed meanwhile (Gradio's own clean-up, say)
        logger.warning("An upload was gone before it could be read.")
        raise gr.Error(UPLOAD_AGAIN, print_exception=False) from None
    except Exception as error:  # no traceback, and not the message: it could name the file
        logger.error("Reading an upload failed with %s.", type(error).__name__)
        raise gr.Error(FAILED, print_exception=False) from None


def picture_suffix(data: bytes) -> str:
    """The file suffix for an image the backend sent (WebP today), so that it is served and saved as what it is."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return ".png"


Outputs = tuple[Any, Any, str]  # overlay, result (as Gradio sends files; or "keep as it is"), status line


def check_request(backend: Backends | None, image: dict[str, Any] | None, category: str, gender: str) -> None:
    """Refuse a request that cannot be relayed, with the sentence that says why: Unavailable when there is no
    backend, else gr.Error (the input)."""
    if backend is None:
        raise Unavailable(NOT_CONFIGURED)
    if not isinstance(image, dict) or not isinstance(image.get("path"), str) or not image["path"]:
        raise gr.Error(NO_PHOTO, print_exception=False)
    for value, choices, what in ((category, CATEGORIES, "category"), (gender, GENDERS, "gender")):
        if value not in choices:
            valid = ", ".join(f"'{choice}'" for choice in choices)
            raise gr.Error(f"Unknown {what} '{value}'. Choose one of {valid}.", print_exception=False)


async def read_upload(upload: Path, decoding: asyncio.Semaphore, *, max_side: int, max_pixels: int) -> bytes:
    """The photo to send (photo_bytes), a few decoded at a time.

    A cancelled request (Stop, or its visitor gone) is cancelled at once, but its decoding thread cannot be: it
    keeps its place among the few until it has really ended, so that Stop cannot start more decodes at once.
    """
    async with decoding:
        decode = asyncio.ensure_future(asyncio.to_thread(photo_bytes, upload, max_side, max_pixels))
        try:
            return await asyncio.shield(decode)
        finally:
            while not decode.done():  # cancelled: the thread runs on; a second cancel waits for it all the same
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({decode})
            if not decode.cancelled():
                decode.exception()  # retrieved: a cancelled request's refusal is nobody's to see, nor to log


def sentence_of(error: Exception) -> str:
    """What the visitor is told for an error: its own sentence, or FAILED (logged by its kind only: a message or
    traceback could carry the backend's address or a server path)."""
    if isinstance(error, gr.Error):
        return error.message
    if isinstance(error, RelayError | TurnedAway):
        return str(error)
    logger.error("The relay failed with %s.", type(error).__name__)
    return FAILED


def relay_endpoint(
    backend: Backends | None,
    *,
    max_side: int,
    max_pixels: int,
    fair_share: FairShare,
    trusted_hops: int,
    files: Files,
    results: Results,
    metrics: FrontMetrics | NoMetrics,
) -> Callable[..., AsyncIterator[Outputs]]:
    """The endpoint: one visitor's request, held to their fair share, relayed to the backend as its own job."""
    decoding = asyncio.Semaphore(DECODES_AT_ONCE)
    tail = Tail()

    async def predict_api(
        image: dict[str, Any] | None, category: str, gender: str, request: gr.Request
    ) -> AsyncIterator[Outputs]:
        """Segment the person in the photo and composite them onto a generated backdrop, streaming the status."""
        # The page keeps its pictures until new ones come, and a refusal or failure ends the run with its sentence
        # in the status line (an error would put "Error" over the pictures); any other caller gets the error.
        on_page = request.headers.get("x-gradio-user") == "app"  # what Gradio's own page sends with each run
        keep = gr.skip() if on_page else None
        with metrics.job() as counted:  # counted from here until it ends, however it ends (front_metrics.py)
            try:
                outputs = run(image, category, gender, request, keep=keep, counted=counted)
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

    async def run(
        image: dict[str, Any] | None, category: str, gender: str, request: gr.Request, *, keep: Any, counted: Job
    ) -> AsyncIterator[Outputs]:
        check_request(backend, image, category, gender)
        visitor = visitor_of(request, trusted_hops)
        # Admission and the upload: until the job is over, however it ends, the visitor holds one of their slots
        # and the upload stays theirs (files.py: a refused or finished run keeps it for the next try).
        with fair_share.slot(visitor), files.using(image["path"], visitor) as upload:
            if upload is None:
                raise gr.Error(files.refusal(visitor) or UPLOAD_AGAIN, print_exception=False)
            photo = await read_upload(upload, decoding, max_side=max_side, max_pixels=max_pixels)
            # A repeat is answered from the kept results (results.py), else the backend runs it and it is kept.
            ip_token = request.headers.get("x-ip-token")
            updates = results.predict(backend, photo, category, gender, visitor, ip_token=ip_token)
            del photo  # the relay holds it until it is sent, and no longer
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
                        yield save_results(latest)
                        tail.add(time.monotonic() - now)  # Gradio has copied, and sent, the pictures
                        return
                    if not pacer.repeats(line := describe(latest, now, tail.seconds)):
                        yield keep, keep, line

    def save_results(finished: Finished) -> Outputs:
        """Keep the finished job's pictures where Gradio serves them (files.py keeps them a while)."""
        overlay, result = (
            files.save_result(data, f"{name}-{time.monotonic_ns()}{picture_suffix(data)}")
            for name, data in (
                ("overlay", base64.b64decode(finished.overlay_b64)),
                ("result", base64.b64decode(finished.result_b64)),
            )
        )
        return picture(overlay), picture(result), finished.status

    return predict_api


def picture(path: Path) -> dict[str, Any]:
    """An output picture as Gradio's Image postprocessing makes it from a file path (the event skips that step)."""
    return ImageData(path=str(path), orig_name=path.name).model_dump()


def create_app(
    backend: Backends | None,
    *,
    max_side: int = MAX_SIDE,
    max_megapixels: float = MAX_MEGAPIXELS,
    max_jobs_per_visitor: int = MAX_JOBS_PER_VISITOR,
    visitor_rate: str = VISITOR_RATE,
    trusted_proxy_hops: int = TRUSTED_PROXY_HOPS,
    keep_files_s: float = KEEP_FILES_S,
    files_quota_mb: float = FILES_QUOTA_MB,
    visitor_files_mb: float = VISITOR_FILES_MB,
    result_cache_entries: int = RESULT_CACHE_ENTRIES,
    result_cache_mb: float = RESULT_CACHE_MB,
    sign_in: bool | None = None,
    metrics_token: str | None = METRICS_TOKEN,
    delete_cache: tuple[int, int] | None = None,
) -> gr.Blocks:
    """Build the page around `backend` (None when unconfigured); serve it with `serve()`, which adds the guard.

    What stays on disk, and for how long, is files.py's alone (its docstring says it). `delete_cache` is Gradio's
    own sweep (every, older than; seconds), off: it removes files by age whatever their use, a photo being tried
    again or a result about to be downloaded included. Set it only as a backstop far longer than `keep_files_s`.
    `sign_in`: show "Sign in with Hugging Face" (default: where the Space provides OAuth, sign_in.py).
    `metrics_token`: the maintainer's token for GET /metrics; without one there is no such route, and nothing is
    counted (front_metrics.py).
    """
    sign_in = available() if sign_in is None else sign_in
    with gr.Blocks(title="Backdrop", delete_cache=delete_cache) as demo:
        files = Files(
            demo.GRADIO_CACHE,
            keep_s=keep_files_s,
            quota_bytes=int(files_quota_mb * 2**20),
            visitor_bytes=int(visitor_files_mb * 2**20),
            trusted_hops=trusted_proxy_hops,
            gradio_sets=demo.temp_file_sets,
        )
        counting = FrontMetrics(backend, kept_bytes=lambda: files.kept_bytes) if metrics_token else None
        gr.Markdown("# Backdrop\nUpload a portrait, pick a style, and get a new background behind the person.")
        if sign_in:  # issue 13, item 6: a signed-in visitor's fair share is their own
            sign_in_button(size="sm", elem_id="sign-in")
        if backend is None:
            gr.Markdown(f"**{NOT_CONFIGURED}**", elem_id="not-configured")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=280):
                photo = gr.Image(label="Photo", type="filepath", sources=["upload", "webcam"], elem_id="photo")
                example = gr.Button("Use the example photo", size="sm", icon=_example_icon())
                category = gr.Dropdown(list(CATEGORIES), value=CATEGORIES[0], label="Category")
                gender = gr.Radio(list(GENDERS), value=GENDERS[0], label="Gender")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run", min_width=80)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=80)
                status = gr.Markdown(elem_id="status")
                gr.Markdown(elem_id="wait")  # how long the line is now: filled in by the browser (waiting.py)
            with gr.Column(min_width=280):
                overlay = gr.Image(label="Overlay", type="filepath", interactive=False, elem_id="overlay")
                result = gr.Image(label="Result", type="filepath", interactive=False, elem_id="result")
        endpoint = relay_endpoint(
            backend,
            max_side=max_side,
            max_pixels=int(max_megapixels * 1e6),
            fair_share=FairShare(max_jobs_per_visitor, visitor_rate, sign_in=sign_in),
            trusted_hops=trusted_proxy_hops,
            files=files,
            metrics=counting or NoMetrics(),
            results=Results(  # result cache (issue 13, item 5): the example's results are everyone's
                max_entries=result_cache_entries,
                max_bytes=int(result_cache_mb * 2**20),
                example=photo_bytes(EXAMPLE_PHOTO, max_side, int(max_megapixels * 1e6)),
            ),
        )
        job = run.click(
            endpoint,
            inputs=[photo, category, gender],
            outputs=[overlay, result, status],
            api_name=API_NAME,
            show_progress_on=[overlay, result],  # the status line shows the words; the bar goes on the images
            concurrency_limit=None,  # every visitor waits in the backend's queue, never in this one
            preprocess=False,  # the photo arrives as a checked upload path; photo_bytes checks it
            postprocess=False,  # the endpoint yields what Gradio sends: no thread hop per output at each update
        )
        stop.click(None, js="() => 'Stopped.'", outputs=[status], cancels=[job], api_visibility="private")
        # Browser-only: fetch the example and hand it to the photo input as a real upload.
        example.click(None, js=_upload_example_js(), api_visibility="private")
        demo.load(None, js=poll_js("wait"), api_visibility="private")  # browser-only: it polls a read-only route
    demo.queue(default_concurrency_limit=None)
    demo.backdrop_metrics = (metrics_token, counting.render) if counting else None  # serve(): GET /metrics
    demo.backdrop_files = files  # serve() hands it to the middleware that sees uploads and deliveries
    demo.backdrop_line = lambda: line_now(backend, about)  # ... and this to the one that serves the wait
    return demo


def _example_icon() -> dict[str, Any]:
    """The example as the button's icon, by the route that serves it (Gradio would show a file's server path)."""
    return {"path": EXAMPLE_PHOTO.name, "url": EXAMPLE_ROUTE, "meta": {"_type": "gradio.FileData"}}


def _upload_example_js() -> str:
    return f"""async () => {{
        const blob = await (await fetch("{EXAMPLE_ROUTE.lstrip("/")}")).blob();
        const input = document.querySelector("#photo input[type=file]");
        const files = new DataTransfer();
        files.items.add(new File([blob], "{EXAMPLE_PHOTO.name}", {{type: "image/png"}}));
        input.files = files.files;
        input.dispatchEvent(new Event("change", {{bubbles: true}}));
    }}"""


# The page's routes besides Gradio's own (guard.ROUTES); with sign-in, SIGN_IN_ROUTES too.
ROUTES = (
    Allowed(POST, UPLOAD, "the visitor's photo (files.py holds each visitor to their share)"),
    Allowed(GET, "/gradio_api/upload_progress", "the page's progress bar while a photo uploads"),
    Allowed(GET, WAIT_ROUTE, "the wait before one runs, which the page polls (waiting.py)"),
    Allowed(GET, EXAMPLE_ROUTE, "the example photo: the button's icon, and what it uploads (files.py)"),
)


def serve(demo: gr.Blocks, **launch_kwargs: Any) -> None:
    """Launch `demo` behind the endpoint guard; returns once the server is up."""
    # Who a visitor is follows TRUSTED_PROXY_HOPS alone: uvicorn would otherwise take X-Forwarded-For from any
    # client on loopback as the address (an explicit FORWARDED_ALLOW_IPS still wins).
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    launch_kwargs.setdefault("max_threads", MAX_VISITORS)  # also Gradio's cap on events running at once
    # Gradio keeps every session's component values (~45 kB here) until this many newer sessions have come; the
    # page reads none of them back, so only the visitors being served need theirs. (Its default keeps 10,000.)
    launch_kwargs.setdefault("state_session_capacity", MAX_VISITORS)
    if importlib.util.find_spec("matplotlib") is None:  # Gradio tries to import it around every generator step
        sys.modules.setdefault("matplotlib", None)  # a failed import then costs nothing instead of a path search
    files = Middleware(FilesMiddleware, files=demo.backdrop_files, example=EXAMPLE_PHOTO.read_bytes())
    wait = Middleware(WaitMiddleware, figure=demo.backdrop_line)
    launch_guarded(
        demo,
        api_name=API_NAME,
        allowed=ROUTES + (SIGN_IN_ROUTES if demo.expects_oauth else ()),
        max_file_size="20mb",
        middleware=[files, wait],
        metrics=demo.backdrop_metrics,
        **launch_kwargs,
    )


def backend_from_env() -> Backends | None:
    """The configured backends, or None, logging which variable is missing (never its value)."""
    if not BACKEND:
        logger.error("BACKEND is not set: the page will say the service is not configured.")
        return None
    if not HF_TOKEN:
        logger.warning("HF_TOKEN is not set: requests to the backend carry no token.")
    return Backends.connect(BACKEND, HF_TOKEN, wake_timeout=BACKEND_WAKE_TIMEOUT, retry_after=BACKEND_RETRY_S)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines carry the backend's address
    app = create_app(backend_from_env())
    serve(app)
    app.block_thread()
