"""Backdrop's private GPU Space: one guarded endpoint, `predict_api`, with the GPU never waiting on the CPU."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import gradio as gr
import numpy as np
from gradio_client import Client
from PIL import Image
from starlette.middleware import Middleware

from back_metrics import BackMetrics, CountFullQueue
from back_settings import (
    BACKEND_TOKEN,
    BACKGROUND_MODEL,
    BACKGROUND_PIXELS,
    BACKGROUND_STEPS,
    CPU_DTYPE,
    GPU_CONCURRENCY,
    MAX_MEGAPIXELS,
    MAX_SIDE,
    MAX_UPLOAD_MB,
    QUEUE_MAX_SIZE,
    SEGMENTATION_MODEL,
    SEGMENTATION_SIZE,
    VAE_MODEL,
)
from choices import CATEGORIES, GENDERS, unknown_choice
from gpu_gate import GpuGate
from guard import GET, Allowed, launch_guarded
from identity import BuildHeader, build_id
from imaging import Photo, PhotoError, composite, decode_photo, encode_photo, overlay, seed_for

API_NAME = "predict_api"
FAILED = "Something went wrong while processing the photo. Please try again."
# The `spaces` package's errors are titled "ZeroGPU …"; this one is no refusal but our own models failing in the GPU
# worker (its message is their exception's class name: spaces/zero/wrappers.py), so it stays a failed job.
ZEROGPU, ZEROGPU_WORKER_ERROR = "ZeroGPU", "ZeroGPU worker error"
# Every relayed request is a session of its own that never comes back, and Gradio keeps each session's last
# inputs and outputs (a photo and two pictures) until it has this many newer ones. Nothing here reads them.
KEPT_SESSIONS = 1
# The routes this app serves besides Gradio's own (guard.ROUTES), each with why.
ROUTES = (Allowed(GET, "/gradio_api/queue/status", "the public relay's probe of a backend (relay.py `status`)"),)
Category = Literal[tuple(CATEGORIES)]  # the API page lists the valid values; predict_api still checks them
Gender = Literal[tuple(GENDERS)]

logger = logging.getLogger("backdrop")


class Pipeline(Protocol):
    """What the app needs of the models (`backdrop.Backdrop`, or a stand-in in tests and benchmarks)."""

    @property
    def class_names(self) -> list[str]: ...

    @property
    def settings(self) -> dict[str, object]:
        """What decides its pictures besides the inputs (model ids or folders, steps…): hashed into the build id."""
        ...

    def render(
        self, photo: Image.Image, prompt: str, seed: int, progress: Any = None
    ) -> tuple[np.ndarray, Image.Image]: ...


def background_prompt(category: str, gender: str) -> str:
    return (
        f"{CATEGORIES[category]}, an empty backdrop for a {category} portrait of a {GENDERS[gender]}, "
        "no people, photorealistic, shallow depth of field"
    )


def all_prompts() -> list[str]:
    """Every prompt a request can ask for: the models encode each once, at load."""
    return [background_prompt(category, gender) for category in CATEGORIES for gender in GENDERS]


def create_app(
    pipeline: Pipeline,
    *,
    gpu_concurrency: int = GPU_CONCURRENCY,
    queue_max_size: int = QUEUE_MAX_SIZE,
    max_side: int = MAX_SIDE,
    max_upload_mb: float = MAX_UPLOAD_MB,
    max_megapixels: float = MAX_MEGAPIXELS,
) -> Back:
    """Build the API-only app around `pipeline`; serve it with `serve()`, which adds the guard.

    Gradio's queue runs two jobs per GPU, so that decoding the next photo and encoding the last results happen
    while the GPU works; the gate lets `gpu_concurrency` of them into the pipeline at once, never more, even while
    a cancelled job's thread winds down.
    """
    gate = GpuGate(gpu_concurrency)
    metrics = BackMetrics(waiting=lambda: _waiting(blocks, endpoint))
    decode = functools.partial(
        decode_photo, max_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_megapixels * 1e6), max_side=max_side
    )
    with gr.Blocks(title="Backdrop backend") as blocks:
        gr.Markdown("This Space is API-only: the public Backdrop Space calls its `predict_api` endpoint.")
        gr.api(_endpoint(pipeline, gate, metrics, decode), api_name=API_NAME, concurrency_limit=gate.slots)
    (endpoint,) = (fn for fn in blocks.fns.values() if fn.api_name == API_NAME)
    blocks.queue(max_size=queue_max_size, default_concurrency_limit=1)
    gate.install(blocks._queue, endpoint)  # ETAs follow the GPU (see gpu_gate), from the first finished job on
    return Back(blocks, metrics, build=build_id([pipeline.settings, max_side]))


@dataclass
class Back:
    """The private app: its Blocks, and the parts `serve()` wires in around it."""

    blocks: gr.Blocks
    metrics: BackMetrics  # served at /metrics to the token
    build: str  # said on every response (identity.py)

    def close(self) -> None:
        self.blocks.close()


def _endpoint(
    pipeline: Pipeline, gate: GpuGate, metrics: BackMetrics, decode: Callable[[str], Photo]
) -> Callable[..., Awaitable[tuple[str, str, str, str]]]:
    """The app's one endpoint: each job counted from start to end, its failures worded for the caller."""

    async def predict_api(image_b64: str, category: Category, gender: Gender) -> tuple[str, str, str, str]:
        """Segment the person in the photo and composite them onto a generated backdrop.

        Takes the photo as base64 or a data URL. Returns, as base64: the photo the models saw (your own bytes
        when it needed no change, else WebP), the class overlay and the result (both WebP); and a status sentence.
        """
        started = time.perf_counter()
        with metrics.job() as outcome:  # done, failed, cancelled, or as refused below (back_metrics.py)
            if unknown := unknown_choice(category, gender):
                outcome.refused("bad_input")
                raise gr.Error(unknown, print_exception=False)
            try:
                pictures = await make_pictures(image_b64, category, gender, gr.Progress())
            except PhotoError as error:
                outcome.refused("bad_input")
                raise gr.Error(str(error), print_exception=False) from None
            except Exception as error:  # one line, no traceback: it could name paths or the model
                if refusal := zerogpu_refusal(error):
                    outcome.refused("gpu_quota")
                    logger.warning("ZeroGPU refused a job (%s).", refusal.title)  # not its message: a visitor's quota
                    raise refusal from None
                logger.error("A job failed with %s.", type(error).__name__)
                raise gr.Error(FAILED, print_exception=False) from None
        return *pictures, f"Done in {time.perf_counter() - started:.1f} s"

    async def make_pictures(image_b64: str, category: str, gender: str, progress: Any) -> tuple[str, str, str]:
        """One job in its slot, where the gate times each stage for the queue's estimates: the photo decoded, the
        GPU's turn, then the pictures composited and encoded."""
        async with gate.job() as slot:
            photo = await asyncio.to_thread(decode, image_b64)
            image = photo.image
            prompt, seed = background_prompt(category, gender), seed_for(image, category, gender)
            decoded = time.perf_counter()
            if requested := getattr(pipeline, "requested_gpu_seconds", None):  # ZeroGPU's duration for it
                metrics.gpu_requested.inc(requested(image))

            def on_gpu() -> tuple[np.ndarray, Image.Image]:
                with metrics.gpu_turn(waiting_since=decoded):
                    return pipeline.render(image, prompt, seed, progress)

            class_map, background = await slot.run(on_gpu, waiting=lambda: progress(0.0, desc="Waiting for the GPU"))
            progress(0.95, desc="Compositing")
            return await asyncio.to_thread(_finish, photo, class_map, background, len(pipeline.class_names))

    return predict_api


def zerogpu_refusal(error: Exception) -> gr.Error | None:
    """ZeroGPU's refusal of the job's GPU call, to send the caller as ZeroGPU wrote it (its title and plain text);
    None for any other error.

    The `spaces` package raises each refusal as a gr.Error titled "ZeroGPU …" (spaces/zero/client.py: quota exceeded,
    pending credits exceeded, illegal duration, queue timeout, client error), a sentence meant for the visitor. Those
    sentences hold GPU seconds requested and left, a wait, and huggingface.co links (sign up, PRO, token settings,
    billing): never a token, a path or a model name. The queue timeout's message is HTML (an HTMLString: `str()` of
    it is its plain text, which the caller gets).
    """
    if not isinstance(error, gr.Error) or not error.title.startswith(ZEROGPU) or error.title == ZEROGPU_WORKER_ERROR:
        return None
    return gr.Error(str(error.message), title=error.title, print_exception=False)


def _finish(photo: Photo, class_map: np.ndarray, background: Image.Image, classes: int) -> tuple[str, str, str]:
    """The photo the models saw, the class overlay and the result, encoded."""
    return (
        photo.original_b64 or encode_photo(photo.image),
        encode_photo(overlay(photo.image, class_map, classes)),
        encode_photo(composite(photo.image, class_map, background)),
    )


def _waiting(blocks: gr.Blocks, fn: Any) -> float:
    """Jobs in Gradio's queue for `fn`, not yet started."""
    queue = getattr(blocks, "_queue", None)
    waiting = queue.event_queue_per_concurrency_id.get(fn.concurrency_id) if queue is not None else None
    return float(len(waiting.queue)) if waiting is not None else 0.0


def serve(back: Back, *, token: str | None = BACKEND_TOKEN, warm_up: bool = True, **launch_kwargs: Any) -> None:
    """Launch the app behind the endpoint guard (and token lock), then warm it up so that ETAs exist at once.

    Returns once the server is up; `GRADIO_SERVER_NAME` and `GRADIO_SERVER_PORT` apply as in any Gradio app.
    """
    # Bodies up to twice the photo limit reach predict_api, which answers with a sentence; larger ones get a 413.
    limit = int(MAX_UPLOAD_MB * 2**20 * 2) + 2**20
    launch_kwargs.setdefault("state_session_capacity", KEPT_SESSIONS)
    build = Middleware(BuildHeader, build=back.build)
    full_queue = Middleware(CountFullQueue, metrics=back.metrics)  # refused before the endpoint
    metrics = (token, back.metrics.render) if token else None  # /metrics: the maintainer's token only
    launch_guarded(
        back.blocks,
        api_name=API_NAME,
        token=token,
        allowed=ROUTES,
        max_body_bytes=limit,
        middleware=[build, full_queue],
        metrics=metrics,
        **launch_kwargs,
    )
    if warm_up:
        url = back.blocks.local_url
        threading.Thread(target=run_warm_up, args=(url, token), daemon=True, name="warm-up").start()


def run_warm_up(url: str, token: str | None) -> None:
    """Run one request through the app's own queue: Gradio gives no ETA until one run has finished."""
    started = time.perf_counter()
    gradient = np.linspace(0, 255, 384 * 384 * 3, dtype=np.float32).reshape(384, 384, 3).astype(np.uint8)
    try:
        client = Client(url, token=token or False, verbose=False, download_files=False)
        client.predict(encode_photo(Image.fromarray(gradient)), "casual", "female", api_name=f"/{API_NAME}")
        client.close()
    except Exception as error:
        logger.error("Warm-up failed with %s; ETAs will appear after the first request.", type(error).__name__)
        return
    logger.info("Warm-up done in %.1f s.", time.perf_counter() - started)


if __name__ == "__main__":
    from backdrop import Backdrop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    models = Backdrop(
        SEGMENTATION_MODEL,
        BACKGROUND_MODEL,
        steps=BACKGROUND_STEPS,
        vae_model=VAE_MODEL,
        prompts=all_prompts(),
        background_pixels=BACKGROUND_PIXELS,
        segmentation_size=SEGMENTATION_SIZE,
        cpu_dtype=CPU_DTYPE,
    )
    app = create_app(models)
    serve(app)
    app.blocks.block_thread()
