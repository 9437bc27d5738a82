"""Backdrop's private GPU Space: one guarded endpoint, `predict_api`, running one GPU job at a time."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol

import gradio as gr
import numpy as np
from gradio_client import Client
from PIL import Image

from guard import launch_guarded
from imaging import PhotoError, composite, decode_photo, encode_png, overlay, seed_for

SEGMENTATION_MODEL = os.getenv("SEGMENTATION_MODEL", "mattmdjaga/segformer_b2_clothes")
BACKGROUND_MODEL = os.getenv("BACKGROUND_MODEL", "stabilityai/sd-turbo")
BACKGROUND_STEPS = int(os.getenv("BACKGROUND_STEPS", "1"))
QUEUE_MAX_SIZE = int(os.getenv("QUEUE_MAX_SIZE", "32"))
MAX_SIDE = int(os.getenv("MAX_SIDE", "1024"))
MAX_UPLOAD_MB = float(os.getenv("MAX_UPLOAD_MB", "10"))
MAX_MEGAPIXELS = float(os.getenv("MAX_MEGAPIXELS", "40"))
BACKEND_TOKEN = os.getenv("BACKEND_TOKEN") or None
API_NAME = "predict_api"

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

    def render(
        self, photo: Image.Image, prompt: str, seed: int, progress: Any = None
    ) -> tuple[np.ndarray, Image.Image]: ...


def background_prompt(category: str, gender: str) -> str:
    return (
        f"{SCENES[category]}, an empty backdrop for a {category} portrait of a {PEOPLE[gender]}, "
        "no people, photorealistic, shallow depth of field"
    )


def _check_choice(value: str, choices: dict[str, str], what: str) -> None:
    if value not in choices:
        valid = ", ".join(f"'{choice}'" for choice in choices)
        raise gr.Error(f"Unknown {what} '{value}'. Choose one of {valid}.", print_exception=False)


def create_app(
    pipeline: Pipeline,
    *,
    queue_max_size: int = QUEUE_MAX_SIZE,
    max_side: int = MAX_SIDE,
    max_upload_mb: float = MAX_UPLOAD_MB,
    max_megapixels: float = MAX_MEGAPIXELS,
) -> gr.Blocks:
    """Build the API-only app around `pipeline`; serve it with `serve()`, which adds the guard."""
    gpu = threading.Lock()  # one job inside the pipeline, even while a cancelled job's thread winds down
    encoder = ThreadPoolExecutor(3, thread_name_prefix="png")  # zlib frees the GIL: the three PNGs encode at once

    def predict_api(image_b64: str, category: Category, gender: Gender) -> tuple[str, str, str, str]:
        """Segment the person in the photo and composite them onto a generated backdrop.

        Takes the photo as base64 or a data URL; returns the photo as processed, the class overlay and the
        result as base64 PNGs, and a status sentence.
        """
        started = time.perf_counter()
        _check_choice(category, SCENES, "category")
        _check_choice(gender, PEOPLE, "gender")
        try:
            photo = decode_photo(
                image_b64,
                max_bytes=int(max_upload_mb * 2**20),
                max_pixels=int(max_megapixels * 1e6),
                max_side=max_side,
            )
        except PhotoError as error:
            raise gr.Error(str(error), print_exception=False) from None
        progress = gr.Progress()
        image = photo.image
        with gpu:
            try:
                seed = seed_for(image, category, gender)
                class_map, background = pipeline.render(image, background_prompt(category, gender), seed, progress)
            except Exception as error:
                logger.error("The pipeline failed with %s.", type(error).__name__)  # no traceback: it names paths
                raise gr.Error("Something went wrong while processing the photo. Please try again.") from None
        progress(0.95, desc="Compositing")
        pictures = [overlay(image, class_map, len(pipeline.class_names)), composite(image, class_map, background)]
        if photo.original_b64 is None:  # the photo itself needs encoding too
            pictures.append(image)
        overlay_b64, result_b64, *encoded = encoder.map(encode_png, pictures)
        image_b64 = photo.original_b64 or encoded[0]
        return image_b64, overlay_b64, result_b64, f"Done in {time.perf_counter() - started:.1f} s"

    with gr.Blocks(title="Backdrop backend") as demo:
        gr.Markdown("This Space is API-only: the public Backdrop Space calls its `predict_api` endpoint.")
        gr.api(predict_api, api_name=API_NAME, concurrency_limit=1)
    demo.queue(max_size=queue_max_size, default_concurrency_limit=1)
    return demo


def serve(demo: gr.Blocks, *, token: str | None = BACKEND_TOKEN, warm_up: bool = True, **launch_kwargs: Any) -> None:
    """Launch `demo` behind the endpoint guard (and token lock), then warm it up so that ETAs exist at once.

    Returns once the server is up; `GRADIO_SERVER_NAME` and `GRADIO_SERVER_PORT` apply as in any Gradio app.
    """
    # Bodies up to twice the photo limit reach predict_api, which answers with a sentence; larger ones get a 413.
    limit = int(MAX_UPLOAD_MB * 2**20 * 2) + 2**20
    launch_guarded(demo, api_name=API_NAME, token=token, max_body_bytes=limit, **launch_kwargs)
    if warm_up:
        threading.Thread(target=run_warm_up, args=(demo.local_url, token), daemon=True, name="warm-up").start()


def run_warm_up(url: str, token: str | None) -> None:
    """Run one request through the app's own queue: Gradio gives no ETA until one run has finished."""
    started = time.perf_counter()
    gradient = np.linspace(0, 255, 384 * 384 * 3, dtype=np.float32).reshape(384, 384, 3).astype(np.uint8)
    try:
        client = Client(url, token=token or False, verbose=False, download_files=False)
        client.predict(encode_png(Image.fromarray(gradient)), "casual", "female", api_name=f"/{API_NAME}")
        client.close()
    except Exception as error:
        logger.error("Warm-up failed with %s; ETAs will appear after the first request.", type(error).__name__)
        return
    logger.info("Warm-up done in %.1f s.", time.perf_counter() - started)


if __name__ == "__main__":
    from backdrop import Backdrop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(Backdrop(SEGMENTATION_MODEL, BACKGROUND_MODEL, steps=BACKGROUND_STEPS))
    serve(app)
    app.block_thread()
