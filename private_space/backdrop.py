"""Backdrop's models: find the person in a photo and paint a new background. The only module that imports torch."""

from __future__ import annotations

import spaces  # must be imported before anything touches CUDA (ZeroGPU)

# isort: split
import logging
import math
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderTiny, AutoPipelineForText2Image
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil
from transformers.utils import logging as transformers_logging

GPU_DURATION_S = int(os.getenv("GPU_DURATION_S", "30"))  # the most ZeroGPU seconds one request may reserve

# What one request is expected to cost on a ZeroGPU slice, generously (no GPU was at hand to measure: these are a
# few times sd-turbo's public fp16 figures on A10G/A100-class cards, about 0.1-0.3 s per 512x512 UNet step).
GPU_START_S = 8.0  # per call: the worker's start, weights paging in, segmentation and text encoding
GPU_STEP_S = 1.0  # one UNet step on 512x512 pixels of background
GPU_DECODE_S = 1.5  # the VAE decode of 512x512 pixels
MAX_ASPECT = 2.0  # backgrounds are at most twice as wide as tall, or as tall as wide

logger = logging.getLogger(__name__)

# This process only serves requests: per-load progress bars would just clutter the Space logs.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

_LIVE: weakref.WeakValueDictionary[int, Backdrop] = weakref.WeakValueDictionary()


def _lookup(key: int) -> Backdrop:
    """Resolve a pickled handle back to the live instance of this process (or of the process it was forked from)."""
    return _LIVE[key]


def background_size(width: int, height: int, *, native: int, multiple: int) -> tuple[int, int]:
    """The background's (width, height) for a photo: the photo's aspect ratio (clamped to MAX_ASPECT) at about
    native x native pixels (the size the model was trained at), each side a multiple of `multiple`."""
    aspect = min(max(width / height, 1 / MAX_ASPECT), MAX_ASPECT)
    side_w = native * math.sqrt(aspect)
    side_h = native / math.sqrt(aspect)
    return max(multiple, round(side_w / multiple) * multiple), max(multiple, round(side_h / multiple) * multiple)


def gpu_seconds(steps: int, width: int, height: int, cap: int = GPU_DURATION_S) -> int:
    """ZeroGPU seconds to reserve for one render: a start cost, then steps and decode in proportion to the
    background's pixels (relative to 512 x 512), capped at `cap`."""
    scale = width * height / 512**2
    return min(cap, math.ceil(GPU_START_S + (GPU_STEP_S * steps + GPU_DECODE_S) * scale))


def _render_duration(
    model: Backdrop, photo: Image.Image, prompt: str, seed: int, progress: Callable[..., object] | None = None
) -> int:
    """`spaces.GPU`'s dynamic duration: called with render's own arguments (self first) before each call."""
    return gpu_seconds(model.steps, *model.background_size(photo))


class Backdrop:
    """Segmentation and background models, loaded once. One render at a time in this process (the app's GPU gate);
    on ZeroGPU each of `GPU_CONCURRENCY` renders runs in a worker process of its own."""

    def __init__(
        self, segmentation_model: str, background_model: str, *, steps: int = 1, vae_model: str | None = None
    ) -> None:
        """Load both models (Hub ids or local folders): CUDA + float16 when available, else CPU float32.

        `vae_model`, when given, is a tiny autoencoder (`AutoencoderTiny`, e.g. madebyollin/taesd for SD 2.x
        latents) that decodes in place of the pipeline's own VAE: far faster, slightly softer pictures.
        """
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.steps = steps
        self.processor = SegformerImageProcessorPil.from_pretrained(segmentation_model)
        self.segmenter = SegformerForSemanticSegmentation.from_pretrained(segmentation_model, dtype=self.dtype)
        self.segmenter.to(self.device).eval()
        components: dict[str, Any] = {}
        if vae_model:
            components["vae"] = AutoencoderTiny.from_pretrained(vae_model, dtype=self.dtype)
        self.pipe: Any = AutoPipelineForText2Image.from_pretrained(background_model, dtype=self.dtype, **components)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        _LIVE[id(self)] = self
        logger.info("Models ready on %s in %s", self.device.type, str(self.dtype).removeprefix("torch."))

    def __reduce__(self) -> tuple[Callable[[int], Backdrop], tuple[int]]:
        # spaces.GPU pickles the call's arguments (self too) into a forked worker that already holds the models.
        return _lookup, (id(self),)

    @property
    def class_names(self) -> list[str]:
        """Class names in class-id order; index 0 is the background class."""
        id2label = self.segmenter.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    def background_size(self, photo: Image.Image) -> tuple[int, int]:
        """(width, height) of the background painted for `photo`: its shape, the model's native pixel count."""
        scale = self.pipe.vae_scale_factor
        native = self.pipe.unet.config.sample_size * scale
        # The UNet halves the latents once per block after the first; the pipeline wants multiples of 8 as well.
        multiple = math.lcm(8, scale * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1))
        return background_size(photo.width, photo.height, native=native, multiple=multiple)

    def requested_gpu_seconds(self, photo: Image.Image) -> int:
        """The ZeroGPU seconds `render` asks for with `photo` (spaces.GPU's duration), for the metrics."""
        return gpu_seconds(self.steps, *self.background_size(photo))

    @spaces.GPU(duration=_render_duration)
    @torch.inference_mode()
    def render(
        self, photo: Image.Image, prompt: str, seed: int, progress: Callable[..., object] | None = None
    ) -> tuple[np.ndarray, Image.Image]:
        """Return the class map (H, W, uint8, same size as photo) and a generated background.

        The background is RGB at the photo's aspect ratio and about the model's native pixel count
        (`background_size`: 576 x 448 for a 1024 x 768 photo with sd-turbo); seed fixes it.
        """

        def report(fraction: float, desc: str) -> None:
            if progress is not None:
                progress(fraction, desc=desc)

        def on_step_end(_pipe: object, i: int, _t: object, tensors: dict[str, Any]) -> dict[str, Any]:
            report(0.3 + 0.6 * (i + 1) / self.steps, f"Painting the backdrop (step {i + 1} of {self.steps})")
            return tensors

        report(0.1, "Finding the person")
        pixels = self.processor(images=photo, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        outputs = self.segmenter(pixel_values=pixels)
        (classes,) = self.processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(photo.height, photo.width)]
        )
        report(0.3, "Painting the backdrop")
        width, height = self.background_size(photo)
        background = self.pipe(
            prompt,
            width=width,
            height=height,
            num_inference_steps=self.steps,
            guidance_scale=0.0,
            generator=torch.Generator(self.device).manual_seed(seed),
            callback_on_step_end=on_step_end,
        ).images[0]
        return classes.to("cpu", torch.uint8).numpy(), background.convert("RGB")
