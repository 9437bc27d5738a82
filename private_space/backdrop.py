"""Backdrop's models: find the person in a photo and paint a new background. The only module that imports torch."""

from __future__ import annotations

import spaces  # must be imported before anything touches CUDA (ZeroGPU)

# isort: split
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import AutoPipelineForText2Image
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil
from transformers.utils import logging as transformers_logging

GPU_DURATION_S = int(os.getenv("GPU_DURATION_S", "30"))  # ZeroGPU time budget for one request

logger = logging.getLogger(__name__)

# This process only serves requests: per-load progress bars would just clutter the Space logs.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

_LIVE: weakref.WeakValueDictionary[int, Backdrop] = weakref.WeakValueDictionary()


def _lookup(key: int) -> Backdrop:
    """Resolve a pickled handle back to the live instance of this process (or of the process it was forked from)."""
    return _LIVE[key]


class Backdrop:
    """Segmentation and background models, loaded once. One render at a time: the app's queue and lock see to it."""

    def __init__(self, segmentation_model: str, background_model: str, *, steps: int = 1) -> None:
        """Load both models (Hub ids or local folders): CUDA + float16 when available, else CPU float32."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.steps = steps
        self.processor = SegformerImageProcessorPil.from_pretrained(segmentation_model)
        self.segmenter = SegformerForSemanticSegmentation.from_pretrained(segmentation_model, dtype=self.dtype)
        self.segmenter.to(self.device).eval()
        self.pipe: Any = AutoPipelineForText2Image.from_pretrained(background_model, dtype=self.dtype)
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

    @spaces.GPU(duration=GPU_DURATION_S)
    @torch.inference_mode()
    def render(
        self, photo: Image.Image, prompt: str, seed: int, progress: Callable[..., object] | None = None
    ) -> tuple[np.ndarray, Image.Image]:
        """Return the class map (H, W, uint8, same size as photo) and a generated background.

        The background is RGB at the pipeline's native square size (512 px for sd-turbo); seed fixes it.
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
        background = self.pipe(
            prompt,
            num_inference_steps=self.steps,
            guidance_scale=0.0,
            generator=torch.Generator(self.device).manual_seed(seed),
            callback_on_step_end=on_step_end,
        ).images[0]
        return classes.to("cpu", torch.uint8).numpy(), background.convert("RGB")
