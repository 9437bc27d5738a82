"""Backdrop's models: find the person in a photo and paint a new background. The only module that imports torch."""

from __future__ import annotations

import spaces  # must be imported before anything touches CUDA (ZeroGPU)

# isort: split
import contextlib
import ctypes
import gc
import logging
import math
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil
from transformers.utils import logging as transformers_logging

from back_settings import GPU_DURATION_S  # the most ZeroGPU seconds one request may reserve
from no_torchvision import without_fallback_notices

with without_fallback_notices():  # diffusers' pipelines import names that need torchvision (no_torchvision.py)
    from diffusers import AutoencoderTiny, AutoPipelineForText2Image
    from diffusers.utils import logging as diffusers_logging

# What one request is expected to cost on a ZeroGPU slice, generously (no GPU was at hand to measure: these are a
# few times sd-turbo's public fp16 figures on A10G/A100-class cards, about 0.1-0.3 s per 512x512 UNet step).
GPU_START_S = 8.0  # per call: the worker's start, weights paging in, segmentation and text encoding
GPU_STEP_S = 1.0  # one UNet step on 512x512 pixels of background
GPU_DECODE_S = 1.5  # the VAE decode of 512x512 pixels
MAX_ASPECT = 2.0  # backgrounds are at most twice as wide as tall, or as tall as wide
# On CPU every pixel counts (README, "The real models on a CPU"): a smaller backdrop, upscaled behind the person
# anyway (and its prompt asks for a shallow depth of field).
CPU_BACKGROUND_PIXELS = 384 * 256  # 384 x 256 for a 4:3 photo instead of sd-turbo's 576 x 448

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


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX): then bfloat16 is about twice as fast as
    float32 here; elsewhere torch emulates it, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _model_dtype(device: torch.device, cpu_dtype: str) -> torch.dtype:
    if device.type == "cuda":
        return torch.float16
    if cpu_dtype == "auto":
        return torch.bfloat16 if cpu_has_bfloat16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cpu_dtype]


def _release_freed_memory() -> None:
    """Hand memory freed after loading back to the system: glibc keeps large freed blocks otherwise."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Backdrop:
    """Segmentation and background models, loaded once. One render at a time in this process (the app's GPU gate);
    on ZeroGPU each of `GPU_CONCURRENCY` renders runs in a worker process of its own."""

    def __init__(
        self,
        segmentation_model: str,
        background_model: str,
        *,
        steps: int = 1,
        vae_model: str | None = None,
        prompts: Iterable[str] = (),
        background_pixels: int | None = None,
        segmentation_size: int | None = None,
        cpu_dtype: str = "auto",
    ) -> None:
        """Load both models (Hub ids or local folders): on CUDA in float16, else on CPU in `cpu_dtype` (float32,
        bfloat16, or auto: bfloat16 where the CPU has bfloat16 units).

        `vae_model`, when given, is a tiny autoencoder (`AutoencoderTiny`, e.g. madebyollin/taesd for SD 2.x
        latents) that decodes in place of the pipeline's own VAE: far faster, slightly softer pictures; the full VAE
        is then never loaded. `prompts`, when given, are encoded once here and are the only ones `render` takes: the
        text encoder is freed before the UNet loads and never runs per request. `background_pixels` caps the
        backdrop's pixel count (at most the model's native one; default: native on GPU, CPU_BACKGROUND_PIXELS on
        CPU); `segmentation_size` is SegFormer's input side (default: its processor's, 512 for
        SegFormer-B2).
        """
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        on_cpu = self.device.type == "cpu"
        self.dtype = _model_dtype(self.device, cpu_dtype)
        self.steps = steps
        self.settings = {
            "segmentation": segmentation_model,
            "background": background_model,
            "steps": steps,
            "vae": vae_model,
            "dtype": str(self.dtype),
        }  # what decides its pictures besides the inputs: the app hashes it into its build id (identity.py)
        self.processor = SegformerImageProcessorPil.from_pretrained(segmentation_model)
        if segmentation_size:
            self.processor.size = {"height": segmentation_size, "width": segmentation_size}
        self.segmenter = SegformerForSemanticSegmentation.from_pretrained(segmentation_model, dtype=self.dtype)
        self.segmenter.to(self.device).eval()
        self.embeddings = self._encode(background_model, list(dict.fromkeys(prompts)))
        components: dict[str, Any] = {"text_encoder": None, "tokenizer": None} if self.embeddings else {}
        if vae_model:
            components["vae"] = AutoencoderTiny.from_pretrained(vae_model, dtype=self.dtype)
        self.pipe: Any = AutoPipelineForText2Image.from_pretrained(background_model, dtype=self.dtype, **components)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.background_pixels = background_pixels or (CPU_BACKGROUND_PIXELS if on_cpu else None)
        _release_freed_memory()
        _LIVE[id(self)] = self
        logger.info("Models ready on %s in %s", self.device.type, str(self.dtype).removeprefix("torch."))

    def _encode(self, background_model: str, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each prompt's text embedding, computed by the pipeline's own text encoder, loaded alone and freed.

        Always on CPU (float32 there when the models run on a GPU): on ZeroGPU no CUDA work may run outside a
        `spaces.GPU` call, and four prompts take about a second.
        """
        if not prompts:
            return {}
        cpu = torch.device("cpu")
        dtype = self.dtype if self.device == cpu else torch.float32
        text_only = AutoPipelineForText2Image.from_pretrained(background_model, unet=None, vae=None, dtype=dtype)
        with torch.inference_mode():
            embeddings = {p: text_only.encode_prompt(p, cpu, 1, False)[0].to(self.device, self.dtype) for p in prompts}
        del text_only
        return embeddings

    def __reduce__(self) -> tuple[Callable[[int], Backdrop], tuple[int]]:
        # spaces.GPU pickles the call's arguments (self too) into a forked worker that already holds the models.
        return _lookup, (id(self),)

    @property
    def class_names(self) -> list[str]:
        """Class names in class-id order; index 0 is the background class."""
        id2label = self.segmenter.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    def background_size(self, photo: Image.Image) -> tuple[int, int]:
        """(width, height) of the background painted for `photo`: its shape, the model's native pixel count or
        `background_pixels` where that is fewer."""
        scale = self.pipe.vae_scale_factor
        native = self.pipe.unet.config.sample_size * scale
        side = min(native, math.sqrt(self.background_pixels)) if self.background_pixels else native
        # The UNet halves the latents once per block after the first; the pipeline wants multiples of 8 as well.
        multiple = math.lcm(8, scale * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1))
        return background_size(photo.width, photo.height, native=side, multiple=multiple)

    def _prompt(self, prompt: str) -> dict[str, Any]:
        """The pipeline's prompt arguments: the cached embedding, or the text where the encoder is loaded."""
        if not self.embeddings:
            return {"prompt": prompt}
        if prompt not in self.embeddings:
            raise ValueError("This prompt was not among those encoded at load.")
        return {"prompt_embeds": self.embeddings[prompt]}

    def requested_gpu_seconds(self, photo: Image.Image) -> int:
        """The ZeroGPU seconds `render` asks for with `photo` (spaces.GPU's duration), for the metrics."""
        return gpu_seconds(self.steps, *self.background_size(photo))

    @spaces.GPU(duration=_render_duration)
    @torch.inference_mode()
    def render(
        self, photo: Image.Image, prompt: str, seed: int, progress: Callable[..., object] | None = None
    ) -> tuple[np.ndarray, Image.Image]:
        """Return the class map (H, W, uint8, same size as photo) and a generated background.

        The background is RGB at the photo's aspect ratio and about the model's native pixel count or fewer
        (`background_size`: 576 x 448 for a 1024 x 768 photo with sd-turbo on GPU, 384 x 256 on CPU); seed fixes it.
        """

        def report(fraction: float, desc: str) -> None:
            if progress is not None:
                progress(fraction, desc=desc)

        def on_step_end(_pipe: object, i: int, _t: object, tensors: dict[str, Any]) -> dict[str, Any]:
            report(0.3 + 0.6 * (i + 1) / self.steps, f"Painting the backdrop (step {i + 1} of {self.steps})")
            return tensors

        prompt_arguments = self._prompt(prompt)
        report(0.1, "Finding the person")
        pixels = self.processor(images=photo, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        outputs = self.segmenter(pixel_values=pixels)
        (classes,) = self.processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(photo.height, photo.width)]
        )
        report(0.3, "Painting the backdrop")
        width, height = self.background_size(photo)
        background = self.pipe(
            **prompt_arguments,
            width=width,
            height=height,
            num_inference_steps=self.steps,
            guidance_scale=0.0,
            generator=torch.Generator(self.device).manual_seed(seed),
            callback_on_step_end=on_step_end,
        ).images[0]
        return classes.to("cpu", torch.uint8).numpy(), background.convert("RGB")
