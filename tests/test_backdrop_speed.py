"""The private Space's CPU levers (backdrop.Backdrop): prompt embeddings computed once, the backdrop's pixel cap,
SegFormer's input size and the CPU dtype, on the tiny random-weight models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_PHOTO
from PIL import Image

from backdrop import Backdrop

PROMPTS = ["a quiet beach at sunset", "a library with tall shelves"]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(EXAMPLE_PHOTO) as image:
        return image.convert("RGB").resize((400, 300))


def load(tiny_models, **kwargs) -> Backdrop:
    return Backdrop(str(tiny_models / "segmentation"), str(tiny_models / "background"), **kwargs)


@pytest.mark.parametrize("cpu_dtype", ["float32", "bfloat16"])
def test_cached_embeddings_paint_what_the_text_encoder_paints(tiny_models, photo, cpu_dtype: str) -> None:
    encoding = load(tiny_models, cpu_dtype=cpu_dtype)
    cached = load(tiny_models, cpu_dtype=cpu_dtype, prompts=[*PROMPTS, PROMPTS[0]])
    assert encoding.pipe.text_encoder is not None
    assert cached.pipe.text_encoder is None  # freed: neither in memory nor on the request path
    assert cached.pipe.tokenizer is None
    assert list(cached.embeddings) == PROMPTS
    for prompt in PROMPTS:
        classes_a, background_a = encoding.render(photo, prompt, seed=3)
        classes_b, background_b = cached.render(photo, prompt, seed=3)
        np.testing.assert_array_equal(classes_a, classes_b)
        np.testing.assert_array_equal(np.asarray(background_a), np.asarray(background_b))
    _, other = cached.render(photo, PROMPTS[1], seed=3)
    assert not np.array_equal(np.asarray(other), np.asarray(cached.render(photo, PROMPTS[0], seed=3)[1]))


def test_a_prompt_not_encoded_at_load_is_refused(tiny_models, photo) -> None:
    cached = load(tiny_models, prompts=PROMPTS[:1])
    with pytest.raises(ValueError, match="not among those encoded"):
        cached.render(photo, PROMPTS[1], seed=1)


def test_the_pixel_cap_shrinks_the_backdrop_and_keeps_the_photos_shape(tiny_models, photo) -> None:
    native = load(tiny_models)
    capped = load(tiny_models, background_pixels=64 * 48)
    native_side = native.pipe.unet.config.sample_size * native.pipe.vae_scale_factor
    assert native.background_size(photo)[0] * native.background_size(photo)[1] == pytest.approx(
        native_side**2, rel=0.2
    )  # CPU_BACKGROUND_PIXELS is above the tiny model's native 128 x 128: the native size it is
    width, height = capped.background_size(photo)
    assert width * height < native_side**2 / 2
    assert width > height
    _, background = capped.render(photo, PROMPTS[0], seed=2)
    assert background.size == (width, height)
    assert load(tiny_models, background_pixels=10**8).background_size(photo) == native.background_size(photo)


def test_segmentation_input_side_is_the_processors_unless_set(tiny_models, photo) -> None:
    default, small = load(tiny_models), load(tiny_models, segmentation_size=128)
    assert default.processor.size == {"height": 512, "width": 512}
    assert small.processor.size == {"height": 128, "width": 128}
    pixels = small.processor(images=photo, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (128, 128)
    classes, _ = small.render(photo, PROMPTS[0], seed=1)
    assert classes.shape == (photo.height, photo.width)  # still the photo's size


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dtype only applies on CPU")
def test_cpu_dtype_can_be_forced_and_bfloat16_stays_deterministic(tiny_models, photo) -> None:
    assert load(tiny_models, cpu_dtype="float32").pipe.unet.dtype == torch.float32
    model = load(tiny_models, cpu_dtype="bfloat16", prompts=PROMPTS)
    assert model.segmenter.dtype == model.pipe.unet.dtype == model.embeddings[PROMPTS[0]].dtype == torch.bfloat16
    first, second = model.render(photo, PROMPTS[0], seed=5), model.render(photo, PROMPTS[0], seed=5)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(np.asarray(first[1]), np.asarray(second[1]))


def test_the_app_encodes_every_choice_once(private_app) -> None:
    prompts = private_app.all_prompts()
    assert len(prompts) == len(set(prompts)) == len(private_app.CATEGORIES) * len(private_app.GENDERS)
    for category in private_app.CATEGORIES:
        for gender in private_app.GENDERS:
            assert private_app.background_prompt(category, gender) in prompts
