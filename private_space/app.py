"""Backdrop's private GPU Space: one guarded endpoint, `predict_api`, with the GPU never waiting on the CPU."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

import gradio as gr
import numpy as np
from gradio_client import Client
from PIL import Image
from starlette.middleware import Middleware

from back_metrics import BackMetrics, CountFullQueue
from gpu_gate import GpuGate
from guard import GET, Allowed, launch_guarded
from identity import BuildHeader, build_id
from imaging import Photo, PhotoError, composite, decode_photo, encode_photo, overlay, seed_for

SEGMENTATION_MODEL = os.getenv("SEGMENTATION_MODEL", "mattmdjaga/segformer_b2_clothes")
BACKGROUND_MODEL = os.getenv("BACKGROUND_MODEL", "stabilityai/sd-turbo")
BACKGROUND_STEPS = int(os.getenv("BACKGROUND_STEPS", "1"))
VAE_MODEL = os.getenv("VAE_MODEL") or None  # a tiny autoencoder (e.g. madebyollin/taesd) to decode with instead
BACKGROUND_PIXELS = int(os.getenv("BACKGROUND_PIXELS") or 0) or None  # backdrop pixel cap; unset: by device
SEGMENTATION_SIZE = int(os.getenv("SEGMENTATION_SIZE") or 0) or None  # SegFormer's input side; unset: its own
CPU_DTYPE = os.getenv("CPU_DTYPE", "auto")  # float32, bfloat16, or auto: bfloat16 where the CPU has bf16 units
QUEUE_MAX_SIZE = int(os.getenv("QUEUE_MAX_SIZE", "32"))
GPU_CONCURRENCY = int(os.getenv("GPU_CONCURRENCY", "1"))  # GPU jobs at once: 1 on a dedicated GPU, more on ZeroGPU
MAX_SIDE = int(os.getenv("MAX_SIDE", "1024"))
MAX_UPLOAD_MB = float(os.getenv("MAX_UPLOAD_MB", "10"))
MAX_MEGAPIXELS = float(os.getenv("MAX_MEGAPIXELS", "40"))
BACKEND_TOKEN = os.getenv("BACKEND_TOKEN") or None
API_NAME = "predict_api"
FAILED = "Something went wrong while processing the photo. Please try again."
# Every relayed request is a session of its own that never comes back, and Gradio keeps each session's last
# inputs and outputs (a photo and two pictures) until it has this many newer ones. Nothing here reads them.
KEPT_SESSIONS = 1

# The choices, each defined once: adding a category is one line here.
SCENES = {
    "casual": "a sunlit city street with a café terrace and soft bokeh",
    "formal": "an elegant wood-panelled office with warm studio lighting",
}
PEOPLE = {"male": "man", "female": "woman"}
Category = Literal[tuple(SCENES)]  # the API page lists the valid values; predict_api still checks them
Gender = Literal[tuple(PEOPLE)]

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
        f"{SCENES[category]}, an empty backdrop for a {category} portrait of a {PEOPLE[gender]}, "
        "no people, photorealistic, shallow depth of field"
    )


def all_prompts() -> list[str]:
    """Every prompt a request can ask for: the models encode each once, at load."""
    return [background_prompt(category, gender) for category in SCENES for gender in PEOPLE]


def _unknown_choice(category: str, gender: str) -> str | None:
    """The sentence for a category or gender the app does not have, or None."""
    for value, choices, what in ((category, SCENES, "category"), (gender, PEOPLE, "gender")):
        if value not in choices:
            valid = ", ".join(f"'{choice}'" for choice in choices)
            return f"Unknown {what} '{value}'. Choose one of {valid}."
    return None


def create_app(
    pipeline: Pipeline,
    *,
    gpu_concurrency: int = GPU_CONCURRENCY,
    queue_max_size: int = QUEUE_MAX_SIZE,
    max_side: int = MAX_SIDE,
    max_upload_mb: float = MAX_UPLOAD_MB,
    max_megapixels: float = MAX_MEGAPIXELS,
) -> gr.Blocks:
    """Build the API-only app around `pipeline`; serve it with `serve()`, which adds the guard.

    Gradio's queue runs two jobs per GPU, so that decoding the next photo and encoding the last results happen
    while the GPU works; the gate lets `gpu_concurrency` of them into the pipeline at once, never more, even while
    a cancelled job's thread winds down.
    """
    gate = GpuGate(gpu_concurrency)
    metrics = BackMetrics(waiting=lambda: _waiting(demo, endpoint))
    decode = functools.partial(
        decode_photo, max_bytes=int(max_upload_mb * 2**20), max_pixels=int(max_megapixels * 1e6), max_side=max_side
    )
    with gr.Blocks(title="Backdrop backend") as demo:
        gr.Markdown("This Space is API-only: the public Backdrop Space calls its `predict_api` endpoint.")
        gr.api(_endpoint(pipeline, gate, metrics, decode), api_name=API_NAME, concurrency_limit=gate.slots)
    (endpoint,) = (fn for fn in demo.fns.values() if fn.api_name == API_NAME)
    demo.queue(max_size=queue_max_size, default_concurrency_limit=1)
    gate.install(demo._queue, endpoint)  # ETAs follow the GPU (see gpu_gate), from the first finished job on
    demo.backdrop_build = build_id([pipeline.settings, max_side])  # serve() says it on every response (identity.py)
    demo.backdrop_metrics = metrics  # serve() serves them at /metrics to the token
    return demo


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
        with metrics.job() as counted:  # done, failed, cancelled, or as refused below (back_metrics.py)
            if unknown := _unknown_choice(category, gender):
                counted.refused("bad_input")
                raise gr.Error(unknown, print_exception=False)
            try:
                pictures = await make_pictures(image_b64, category, gender, gr.Progress())
            except PhotoError as error:
                counted.refused("bad_input")
                raise gr.Error(str(error), print_exception=False) from None
            except Exception as error:  # one line, no traceback: it could name paths or the model
                logger.error("A job failed with %s.", type(error).__name__)
                raise gr.Error(FAILED, print_exception=False) from None
        return *pictures, f"Done in {time.perf_counter() - started:.1f} s"

    async def make_pictures(image_b64: str, category: str, gender: str, progress: Any) -> tuple[str, str, str]:
        """One job in its slot, where the gate times each stage for the queue's estimates: the photo decoded, the
        GPU's turn, then the pictures composited and encoded."""
        async with gate.job() as job:
            photo = await asyncio.to_thread(decode, image_b64)
            image = photo.image
            prompt, seed = background_prompt(category, gender), seed_for(image, category, gender)
            decoded = time.perf_counter()
            if requested := getattr(pipeline, "requested_gpu_seconds", None):  # ZeroGPU's duration for it
                metrics.gpu_requested.inc(requested(image))

            def on_gpu() -> tuple[np.ndarray, Image.Image]:
                with metrics.gpu_turn(waiting_since=decoded):
                    return pipeline.render(image, prompt, seed, progress)

            class_map, background = await job.run(on_gpu, waiting=lambda: progress(0.0, desc="Waiting for the GPU"))
            progress(0.95, desc="Compositing")
            return await asyncio.to_thread(_finish, photo, class_map, background, len(pipeline.class_names))

    return predict_api


def _finish(photo: Photo, class_map: np.ndarray, background: Image.Image, classes: int) -> tuple[str, str, str]:
    """The photo the models saw, the class overlay and the result, encoded."""
    return (
        photo.original_b64 or encode_photo(photo.image),
        encode_photo(overlay(photo.image, class_map, classes)),
        encode_photo(composite(photo.image, class_map, background)),
    )


def _waiting(demo: gr.Blocks, fn: Any) -> float:
    """Jobs in Gradio's queue for `fn`, not yet started."""
    queue = getattr(demo, "_queue", None)
    waiting = queue.event_queue_per_concurrency_id.get(fn.concurrency_id) if queue is not None else None
    return float(len(waiting.queue)) if waiting is not None else 0.0


# Besides Gradio's own routes (guard.ROUTES):
ROUTES = (Allowed(GET, "/gradio_api/queue/status", "the public relay's probe of a backend (relay.py `status`)"),)


def serve(demo: gr.Blocks, *, token: str | None = BACKEND_TOKEN, warm_up: bool = True, **launch_kwargs: Any) -> None:
    """Launch `demo` behind the endpoint guard (and token lock), then warm it up so that ETAs exist at once.

    Returns once the server is up; `GRADIO_SERVER_NAME` and `GRADIO_SERVER_PORT` apply as in any Gradio app.
    """
    # Bodies up to twice the photo limit reach predict_api, which answers with a sentence; larger ones get a 413.
    limit = int(MAX_UPLOAD_MB * 2**20 * 2) + 2**20
    launch_kwargs.setdefault("state_session_capacity", KEPT_SESSIONS)
    build = Middleware(BuildHeader, build=demo.backdrop_build)
    full_queue = Middleware(CountFullQueue, metrics=demo.backdrop_metrics)  # refused before the endpoint
    metrics = (token, demo.backdrop_metrics.render) if token else None  # /metrics: the maintainer's token only
    launch_guarded(
        demo,
        api_name=API_NAME,
        token=token,
        allowed=ROUTES,
        max_body_bytes=limit,
        middleware=[build, full_queue],
        metrics=metrics,
        **launch_kwargs,
    )
    if warm_up:
        threading.Thread(target=run_warm_up, args=(demo.local_url, token), daemon=True, name="warm-up").start()


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
    app.block_thread()
