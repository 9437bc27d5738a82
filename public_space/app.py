"""Backdrop's public Space: a thin relay that shows each visitor their live place, wait and progress in the GPU queue.

It holds no model: each request runs on the private Space (`BACKEND`) as that visitor's own job.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import gradio as gr
from front_metrics import FrontMetrics, outcome_of
from PIL import Image, ImageOps
from starlette.middleware import Middleware

from backends import RETRY_DOWN_S, Backends
from files import EXAMPLE_ROUTE, Files, FilesMiddleware
from guard import launch_guarded
from photo_rules import PhotoError, load_photo, open_photo
from relay import FAILED, Finished, Queued, RelayError, Running, Update, Waking
from visitors import FairShare, visitor_of

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
KEEP_FILES_S = float(os.getenv("KEEP_FILES_S", "300"))  # the longest an unused upload or unfetched result stays
DECODES_AT_ONCE = 2  # photos being decoded to be downscaled: each can take up to 4 bytes per pixel
API_NAME = "predict_api"
CATEGORIES = ("casual", "formal")
GENDERS = ("male", "female")
EXAMPLE_PHOTO = Path(__file__).parent / "examples" / "astronaut.png"
TICK_S = 1.0  # the countdown's step, and how soon a visitor who left is noticed

NOT_CONFIGURED = "The service is not configured yet. Please try again later."
NO_PHOTO = "Please upload a photo first."
UPLOAD_AGAIN = "Please upload your photo again: photos are removed from the server once they have been used."

logger = logging.getLogger("backdrop")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def about(seconds: float) -> str:
    """A wait in words: to the tenth of a second below 10 s (a short job is often under one), then coarser."""
    if seconds < 9.95:
        return f"about {max(0.1, seconds):.1f} s"
    return f"about {round(seconds)} s" if seconds < 90 else f"about {round(seconds / 60)} min"


def describe(update: Update | None, now: float) -> str:
    """The status line for an update (None: nothing heard yet); a queue estimate counts down from when it arrived."""
    if update is None:
        return "Sending your photo…"
    if isinstance(update, Waking):
        return "Waking up the GPU… this can take a minute."
    if isinstance(update, Queued):
        place = "next in line" if update.rank == 0 else f"{ordinal(update.rank + 1)} in line"
        wait = "" if update.eta is None else f" · {about(update.eta - (now - update.received))}"
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


async def ticking(updates: AsyncIterator[Update]) -> AsyncIterator[Update | None]:
    """The backend's updates as they come, and None every TICK_S between them (to count down and check in)."""
    pending = asyncio.ensure_future(anext(updates))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=TICK_S)
            if not done:
                yield None
                continue
            try:
                update = pending.result()
            except StopAsyncIteration:
                return
            yield update
            pending = asyncio.ensure_future(anext(updates))
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):  # its outcome no longer matters; it must be over before aclose()
            await pending
        await updates.aclose()


Outputs = tuple[str | None, str | None, str]  # overlay file, result file, status line


def check_request(backend: Backends | None, image: dict[str, Any] | None, category: str, gender: str) -> None:
    """Refuse (gr.Error) a request that cannot be relayed, with the sentence that says why."""
    if backend is None:
        raise gr.Error(NOT_CONFIGURED, print_exception=False)
    if not isinstance(image, dict) or not isinstance(image.get("path"), str) or not image["path"]:
        raise gr.Error(NO_PHOTO, print_exception=False)
    for value, choices, what in ((category, CATEGORIES, "category"), (gender, GENDERS, "gender")):
        if value not in choices:
            valid = ", ".join(f"'{choice}'" for choice in choices)
            raise gr.Error(f"Unknown {what} '{value}'. Choose one of {valid}.", print_exception=False)


async def read_upload(
    upload: Path, files: Files, decoding: asyncio.Semaphore, *, max_side: int, max_pixels: int
) -> bytes:
    """The photo to send (photo_bytes), a few decoded at a time; the taken upload is used up either way.

    A cancelled request (Stop, or its visitor gone) is cancelled at once, but its decoding thread cannot be: it
    keeps its place among the few until it has really ended, so that Stop cannot start more decodes at once.
    """
    try:
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
    finally:
        files.used(upload)


def relay_endpoint(  # noqa: PLR0915 - the metrics hooks; journey splits predict_api
    backend: Backends | None,
    *,
    max_side: int,
    max_pixels: int,
    fair_share: FairShare,
    trusted_hops: int,
    files: Files,
    metrics: FrontMetrics,
) -> Callable[..., AsyncIterator[Outputs]]:
    """The endpoint: one visitor's request, held to their fair share, relayed to the backend as its own job."""
    outputs_dir = Path(tempfile.mkdtemp(prefix="backdrop-"))
    decoding = asyncio.Semaphore(DECODES_AT_ONCE)

    def save_picture(b64: str, name: str) -> str:
        data = base64.b64decode(b64)
        path = outputs_dir / f"{name}-{time.monotonic_ns()}{picture_suffix(data)}"
        path.write_bytes(data)
        return str(path)

    async def predict_api(  # noqa: PLR0912, PLR0915 - the metrics hooks, until predict_api is split
        image: dict[str, Any] | None, category: str, gender: str, request: gr.Request
    ) -> AsyncIterator[Outputs]:
        """Segment the person in the photo and composite them onto a generated backdrop, streaming the status."""
        progress = gr.Progress()
        with metrics.job() as counted:  # METRICS HOOK: the job's count, from here until it ends however it ends
            try:
                check_request(backend, image, category, gender)
            except gr.Error:
                if backend is not None:
                    counted.refused("bad_input")  # METRICS HOOK: refused, bad input
                raise
            visitor = visitor_of(request, trusted_hops)
            if refusal := fair_share.admit(visitor):
                counted.refused(refusal.reason)  # METRICS HOOK: refused, "fair_share" (jobs at once) or "rate"
                raise gr.Error(refusal, print_exception=False)  # the upload stays (a while) for the next try
            try:  # from here until the job is over, however it ends, the visitor holds one of their slots
                if (upload := files.take(image["path"], visitor)) is None:
                    raise gr.Error(UPLOAD_AGAIN, print_exception=False)
                photo = await read_upload(upload, files, decoding, max_side=max_side, max_pixels=max_pixels)
            except BaseException as error:
                fair_share.release(visitor)
                if isinstance(error, gr.Error):
                    counted.refused("bad_input")  # METRICS HOOK: the photo cannot be used
                raise
            updates = backend.predict(photo, category, gender, ip_token=request.headers.get("x-ip-token"))
            del photo  # the relay holds it until it is sent, and no longer
            latest: Update | None = None
            made: list[Path] = []
            try:
                async with contextlib.aclosing(ticking(updates)) as stream:
                    async for update in stream:
                        latest = update or latest
                        if isinstance(latest, Running):
                            counted.run()  # METRICS HOOK: the backend started it (counted once)
                        if isinstance(latest, Running) and latest.fraction is not None:
                            progress(latest.fraction, desc=latest.desc)
                        if isinstance(latest, Finished):
                            made = [
                                Path(save_picture(latest.overlay_b64, "overlay")),
                                Path(save_picture(latest.result_b64, "result")),
                            ]
                            files.made(*(path.name for path in made))  # Gradio's cached copies go once fetched
                            counted.done()  # METRICS HOOK: done (before the last yield: a visitor may leave there)
                            yield str(made[0]), str(made[1]), latest.status
                            return
                        yield None, None, describe(latest, time.monotonic())
            except RelayError as error:
                counted.outcome = outcome_of(error)  # METRICS HOOK: queue full, refused input, lost or failed
                yield None, None, str(error)
                raise gr.Error(str(error), print_exception=False) from None
            except Exception as error:  # no traceback in the logs: it could carry the backend's address
                logger.error("The relay failed with %s.", type(error).__name__)
                raise gr.Error(FAILED, print_exception=False) from None
            finally:
                fair_share.release(visitor)
                for path in made:  # Gradio has copied them into its cache by now
                    path.unlink(missing_ok=True)

    return predict_api


def create_app(
    backend: Backends | None,
    *,
    max_side: int = MAX_SIDE,
    max_megapixels: float = MAX_MEGAPIXELS,
    max_jobs_per_visitor: int = MAX_JOBS_PER_VISITOR,
    visitor_rate: str = VISITOR_RATE,
    trusted_proxy_hops: int = TRUSTED_PROXY_HOPS,
    keep_files_s: float = KEEP_FILES_S,
    delete_cache: tuple[int, int] | None = (int(KEEP_FILES_S), int(KEEP_FILES_S)),
) -> gr.Blocks:
    """Build the page around `backend` (None when unconfigured); serve it with `serve()`, which adds the guard.

    Uploads and results are removed as soon as they are used (files.py) and after `keep_files_s` at the latest;
    `delete_cache` (every, older than; seconds) is Gradio's own sweep of anything else. Tests that run several
    apps in one process pass None: apps share Gradio's content-addressed cache, and one app's clean-up at exit
    would delete another's uploads.
    """
    with gr.Blocks(title="Backdrop", delete_cache=delete_cache) as demo:
        files = Files(
            demo.GRADIO_CACHE, keep_files_s, trusted_hops=trusted_proxy_hops, gradio_sets=demo.temp_file_sets
        )
        gr.Markdown("# Backdrop\nUpload a portrait, pick a style, and get a new background behind the person.")
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
            with gr.Column(min_width=280):
                overlay = gr.Image(label="Overlay", type="filepath", interactive=False, elem_id="overlay")
                result = gr.Image(label="Result", type="filepath", interactive=False, elem_id="result")
        metrics = FrontMetrics(backend, kept_bytes=lambda: getattr(files, "kept_bytes", 0))
        endpoint = relay_endpoint(
            backend,
            max_side=max_side,
            max_pixels=int(max_megapixels * 1e6),
            fair_share=FairShare(max_jobs_per_visitor, visitor_rate),
            trusted_hops=trusted_proxy_hops,
            files=files,
            metrics=metrics,
        )
        job = run.click(
            endpoint,
            inputs=[photo, category, gender],
            outputs=[overlay, result, status],
            api_name=API_NAME,
            show_progress_on=[overlay, result],  # the status line shows the words; the bar goes on the images
            concurrency_limit=None,  # every visitor waits in the backend's queue, never in this one
            preprocess=False,  # the photo arrives as a checked upload path; photo_bytes checks it
        )
        stop.click(None, js="() => 'Stopped.'", outputs=[status], cancels=[job], api_visibility="private")
        # Browser-only: fetch the example and hand it to the photo input as a real upload.
        example.click(None, js=_upload_example_js(), api_visibility="private")
    demo.queue(default_concurrency_limit=None)
    demo.backdrop_metrics = metrics  # serve() serves them at /metrics to METRICS_TOKEN
    demo.backdrop_files = files  # serve() hands it to the middleware that sees uploads and deliveries
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


def serve(demo: gr.Blocks, **launch_kwargs: Any) -> None:
    """Launch `demo` behind the endpoint guard; returns once the server is up. With METRICS_TOKEN set, GET /metrics
    with that token answers the maintainer's figures; without it there is no such route."""
    # Who a visitor is follows TRUSTED_PROXY_HOPS alone: uvicorn would otherwise take X-Forwarded-For from any
    # client on loopback as the address (an explicit FORWARDED_ALLOW_IPS still wins).
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    launch_kwargs.setdefault("max_threads", MAX_VISITORS)  # also Gradio's cap on events running at once
    # Gradio keeps every session's component values (~45 kB here) until this many newer sessions have come; the
    # page reads none of them back, so only the visitors being served need theirs. (Its default keeps 10,000.)
    launch_kwargs.setdefault("state_session_capacity", MAX_VISITORS)
    files = Middleware(FilesMiddleware, files=demo.backdrop_files, example=EXAMPLE_PHOTO.read_bytes())
    metrics = (METRICS_TOKEN, demo.backdrop_metrics.render) if METRICS_TOKEN else None
    launch_guarded(
        demo,
        api_name=API_NAME,
        allow_uploads=True,
        max_file_size="20mb",
        middleware=[files],
        metrics=metrics,
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
