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
from PIL import Image, ImageOps, UnidentifiedImageError

from guard import launch_guarded
from relay import FAILED, RETRY_DOWN_S, Backend, Backends, Finished, Queued, RelayError, Running, Update, Waking

BACKEND = [target.strip() for target in os.getenv("BACKEND", "").split(",") if target.strip()]  # Space ids or URLs
BACKEND_RETRY_S = float(os.getenv("BACKEND_RETRY_S", RETRY_DOWN_S))  # a failed backend is probed again after this
HF_TOKEN = os.getenv("HF_TOKEN") or None
BACKEND_WAKE_TIMEOUT = float(os.getenv("BACKEND_WAKE_TIMEOUT", "180"))
MAX_SIDE = int(os.getenv("MAX_SIDE", "1024"))  # the backend's own limit: larger photos are downscaled here first
MAX_VISITORS = int(os.getenv("MAX_VISITORS", "256"))  # requests relayed at once (each waits in the backend queue)
API_NAME = "predict_api"
CATEGORIES = ("casual", "formal")
GENDERS = ("male", "female")
EXAMPLE_PHOTO = Path(__file__).parent / "examples" / "astronaut.png"
TICK_S = 1.0  # the countdown's step, and how soon a visitor who left is noticed

NOT_CONFIGURED = "The service is not configured yet. Please try again later."
NOT_AN_IMAGE = "The upload is not an image. Please choose a JPEG, PNG or WebP photo."
RAW_FORMATS = {"JPEG", "PNG", "WEBP"}

logger = logging.getLogger("backdrop")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def about(seconds: float) -> str:
    seconds = max(1, round(seconds))
    return f"about {seconds} s" if seconds < 90 else f"about {round(seconds / 60)} min"


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


def photo_bytes(path: str, max_side: int) -> bytes:
    """The upload as it is when the backend can take it, else upright, flattened and downscaled (JPEG).

    The backend applies EXIF orientation itself, so only a photo that must be downscaled is decoded here.
    """
    try:
        with Image.open(path) as photo:  # reads the header only
            if photo.format in RAW_FORMATS and max(photo.size) <= max_side:
                return Path(path).read_bytes()
            photo.load()
            image = ImageOps.exif_transpose(photo).convert("RGBA")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise gr.Error(NOT_AN_IMAGE, print_exception=False) from None
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    flat = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    buffer = io.BytesIO()
    flat.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


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


def relay_endpoint(backend: Backend | Backends | None, max_side: int) -> Callable[..., AsyncIterator[Outputs]]:
    """The endpoint: one visitor's request, relayed to the backend as its own job."""
    outputs_dir = Path(tempfile.mkdtemp(prefix="backdrop-"))

    def save_png(b64: str, name: str) -> str:
        path = outputs_dir / f"{name}-{time.monotonic_ns()}.png"
        path.write_bytes(base64.b64decode(b64))
        return str(path)

    async def predict_api(
        image: dict[str, Any] | None, category: str, gender: str, request: gr.Request
    ) -> AsyncIterator[Outputs]:
        """Segment the person in the photo and composite them onto a generated backdrop, streaming the status."""
        progress = gr.Progress()
        if backend is None:
            raise gr.Error(NOT_CONFIGURED, print_exception=False)
        if not image or not image.get("path"):
            raise gr.Error("Please upload a photo first.", print_exception=False)
        for value, choices, what in ((category, CATEGORIES, "category"), (gender, GENDERS, "gender")):
            if value not in choices:
                valid = ", ".join(f"'{choice}'" for choice in choices)
                raise gr.Error(f"Unknown {what} '{value}'. Choose one of {valid}.", print_exception=False)
        photo = await asyncio.to_thread(photo_bytes, image["path"], max_side)
        updates = backend.predict(photo, category, gender, ip_token=request.headers.get("x-ip-token"))
        del photo  # the relay holds it until it is sent, and no longer
        latest: Update | None = None
        files: list[Path] = []
        try:
            async with contextlib.aclosing(ticking(updates)) as stream:
                async for update in stream:
                    latest = update or latest
                    if isinstance(latest, Running) and latest.fraction is not None:
                        progress(latest.fraction, desc=latest.desc)
                    if isinstance(latest, Finished):
                        files = [
                            Path(save_png(latest.overlay_b64, "overlay")),
                            Path(save_png(latest.result_b64, "result")),
                        ]
                        yield str(files[0]), str(files[1]), latest.status
                        return
                    yield None, None, describe(latest, time.monotonic())
        except RelayError as error:
            yield None, None, str(error)
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:  # no traceback in the logs: it could carry the backend's address
            logger.error("The relay failed with %s.", type(error).__name__)
            raise gr.Error(FAILED, print_exception=False) from None
        finally:
            for path in files:  # Gradio has copied them into its cache by now
                path.unlink(missing_ok=True)

    return predict_api


def create_app(
    backend: Backend | Backends | None,
    *,
    max_side: int = MAX_SIDE,
    delete_cache: tuple[int, int] | None = (3600, 3600),
) -> gr.Blocks:
    """Build the page around `backend` (None when unconfigured); serve it with `serve()`, which adds the guard.

    `delete_cache` (every, older than; seconds) bounds the uploads and results kept on disk. Tests that run
    several apps in one process pass None: apps share Gradio's content-addressed cache, and one app's
    clean-up at exit would delete another's uploads.
    """
    with gr.Blocks(title="Backdrop", delete_cache=delete_cache) as demo:
        gr.Markdown("# Backdrop\nUpload a portrait, pick a style, and get a new background behind the person.")
        if backend is None:
            gr.Markdown(f"**{NOT_CONFIGURED}**", elem_id="not-configured")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=280):
                photo = gr.Image(label="Photo", type="filepath", sources=["upload", "webcam"], elem_id="photo")
                example = gr.Button("Use the example photo", size="sm", icon=str(EXAMPLE_PHOTO))
                category = gr.Dropdown(list(CATEGORIES), value=CATEGORIES[0], label="Category")
                gender = gr.Radio(list(GENDERS), value=GENDERS[0], label="Gender")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="run", min_width=80)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=80)
                status = gr.Markdown(elem_id="status")
            with gr.Column(min_width=280):
                overlay = gr.Image(
                    label="Overlay", type="filepath", format="png", interactive=False, elem_id="overlay"
                )
                result = gr.Image(label="Result", type="filepath", format="png", interactive=False, elem_id="result")
        job = run.click(
            relay_endpoint(backend, max_side),
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
    return demo


def _upload_example_js() -> str:
    return f"""async () => {{
        const blob = await (await fetch("gradio_api/file={EXAMPLE_PHOTO.resolve()}")).blob();
        const input = document.querySelector("#photo input[type=file]");
        const files = new DataTransfer();
        files.items.add(new File([blob], "{EXAMPLE_PHOTO.name}", {{type: "image/png"}}));
        input.files = files.files;
        input.dispatchEvent(new Event("change", {{bubbles: true}}));
    }}"""


def serve(demo: gr.Blocks, **launch_kwargs: Any) -> None:
    """Launch `demo` behind the endpoint guard; returns once the server is up."""
    gr.set_static_paths([EXAMPLE_PHOTO])
    launch_kwargs.setdefault("max_threads", MAX_VISITORS)  # also Gradio's cap on events running at once
    launch_guarded(demo, api_name=API_NAME, allow_uploads=True, max_file_size="20mb", **launch_kwargs)


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
