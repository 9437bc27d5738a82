"""The tiny-model script and the private Space's model code (backdrop.Backdrop), on CPU with tiny random weights."""

from __future__ import annotations

import base64
import importlib.util
import inspect
import io
import logging
import multiprocessing
import pickle
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_PHOTO, ROOT, TLS, running
from gradio_client import Client
from make_tiny_models import LABELS, clip_tokenizer
from PIL import Image

from backdrop import GPU_DURATION_S, Backdrop, _render_duration, background_size, cpu_has_bfloat16, gpu_seconds

PROMPT = "a quiet beach at sunset"


@pytest.fixture(scope="module")
def backdrop(tiny_models: Path) -> Backdrop:
    return Backdrop(str(tiny_models / "segmentation"), str(tiny_models / "background"))


@pytest.fixture(scope="module")
def two_step(tiny_models: Path) -> Backdrop:
    return Backdrop(str(tiny_models / "segmentation"), str(tiny_models / "background"), steps=2)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(EXAMPLE_PHOTO) as image:
        return image.convert("RGB")


def reference_classes(model: Backdrop, image: Image.Image) -> np.ndarray:
    """The class map computed step by step: processor, model, bilinear upsample to the photo, argmax."""
    pixels = model.processor(images=image, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    with torch.inference_mode():
        logits = model.segmenter(pixel_values=pixels).logits
        logits = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear")
    return logits.argmax(dim=1)[0].cpu().numpy()


# --- scripts/make_tiny_models.py ---


def test_script_writes_both_folders_and_they_reload(tiny_models: Path) -> None:
    from diffusers import AutoPipelineForText2Image, EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil

    segmenter = SegformerForSemanticSegmentation.from_pretrained(tiny_models / "segmentation")
    assert segmenter.config.num_labels == 18
    assert [segmenter.config.id2label[i] for i in range(18)] == LABELS
    assert segmenter.config.label2id == {label: i for i, label in enumerate(LABELS)}
    processor = SegformerImageProcessorPil.from_pretrained(tiny_models / "segmentation")
    assert processor.size == {"height": 512, "width": 512}

    pipe = AutoPipelineForText2Image.from_pretrained(tiny_models / "background")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.safety_checker is None
    tokens = pipe.tokenizer(PROMPT).input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(tokens)[1:-1] == [
        "a</w>",
        "quiet</w>",
        "beach</w>",
        "at</w>",
        "sunset</w>",
    ]
    weights = sum(f.stat().st_size for f in tiny_models.rglob("*") if f.is_file())
    assert weights < 8_000_000  # CLIP's 49408-token embedding at hidden size 16, and its vocab.json and merges.txt


def test_script_prints_what_it_wrote_and_nothing_about_torchvision(tiny_models: Path) -> None:
    """transformers' notices that diffusers' pipelines name torchvision-only classes are left out (no_torchvision.py);
    so are the progress bars of its saves."""
    printed = (tiny_models / "made.log").read_text().splitlines()
    assert [line.split(" (")[0] for line in printed] == [
        f"wrote {tiny_models / name}" for name in ("segmentation", "background", "vae-tiny")
    ]


def test_script_is_deterministic(tiny_models: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_tiny_models", ROOT / "scripts" / "make_tiny_models.py")
    assert spec is not None
    assert spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path)])
    written = sorted(p.relative_to(tiny_models) for p in tiny_models.rglob("*.safetensors"))
    assert len(written) == 5
    for relative in written:
        assert (tmp_path / relative).read_bytes() == (tiny_models / relative).read_bytes(), relative


# --- private_space/backdrop.py ---


def test_class_names_follow_class_ids_with_background_first(backdrop: Backdrop) -> None:
    assert backdrop.class_names == LABELS


def cpu_dtype() -> torch.dtype:
    return torch.bfloat16 if cpu_has_bfloat16() else torch.float32


def test_cuda_runs_in_float16_and_cpu_in_bfloat16_where_it_has_bf16_units(backdrop: Backdrop) -> None:
    device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", cpu_dtype())
    assert backdrop.device.type == device
    assert backdrop.segmenter.dtype == dtype
    assert backdrop.pipe.unet.dtype == dtype


@pytest.mark.parametrize("box", [None, (100, 150, 400, 350)], ids=["square", "300x200"])
def test_render_returns_class_map_of_photo_size_and_rgb_background(
    backdrop: Backdrop, photo: Image.Image, capfd: pytest.CaptureFixture[str], box: tuple | None
) -> None:
    image = photo if box is None else photo.crop(box)
    capfd.readouterr()
    classes, background = backdrop.render(image, PROMPT, seed=1)
    assert capfd.readouterr() == ("", "")  # no progress bars or prints per request
    assert classes.dtype == np.uint8
    assert classes.shape == (image.height, image.width)
    assert classes.max() < 18
    np.testing.assert_array_equal(classes, reference_classes(backdrop, image))
    assert isinstance(background, Image.Image)
    assert background.mode == "RGB"
    assert background.size == backdrop.background_size(image)
    assert background.width / background.height == pytest.approx(image.width / image.height, rel=0.1)
    assert np.asarray(background).std() > 1  # a painted image, not a blank one


def test_background_size_keeps_the_photos_shape_at_the_models_pixel_count() -> None:
    assert background_size(512, 512, native=512, multiple=64) == (512, 512)
    assert background_size(1024, 768, native=512, multiple=64) == (576, 448)  # 1.29 for 1.33, 0.98 x 512²
    assert background_size(768, 1024, native=512, multiple=64) == (448, 576)
    assert background_size(600, 3000, native=512, multiple=64) == (384, 704)  # 1:5 clamps to about 1:2
    for width, height in ((1024, 768), (333, 1000), (1000, 999), (4000, 1000), (50, 60)):
        w, h = background_size(width, height, native=512, multiple=64)
        assert w % 64 == 0
        assert h % 64 == 0
        assert 0.8 < w * h / 512**2 < 1.2
        assert (w > h) == (width > height) or w == h


def test_a_tall_photo_gets_a_tall_background(backdrop: Backdrop, photo: Image.Image) -> None:
    tall = photo.crop((128, 0, 384, 512))  # 256 x 512
    classes, background = backdrop.render(tall, PROMPT, seed=2)
    assert classes.shape == (512, 256)
    assert background.height > background.width
    assert background.height / background.width == pytest.approx(2, rel=0.1)
    native = backdrop.pipe.unet.config.sample_size * backdrop.pipe.vae_scale_factor
    assert 0.8 < background.width * background.height / native**2 < 1.2  # about as many pixels as the model's


def test_gpu_seconds_grow_with_steps_and_pixels_and_stop_at_the_cap() -> None:
    assert gpu_seconds(1, 512, 512, cap=100) == 11  # 8 s start + (1 s per step + 1.5 s decode) x 1
    assert gpu_seconds(4, 576, 448, cap=100) == 14  # 8 + (4 + 1.5) x 0.98, rounded up
    assert gpu_seconds(2, 1024, 1024, cap=100) == 22  # 8 + (2 + 1.5) x 4
    assert gpu_seconds(50, 1024, 1024, cap=30) == 30
    assert gpu_seconds(1, 512, 512) <= GPU_DURATION_S


def test_render_duration_takes_renders_arguments(backdrop: Backdrop, two_step: Backdrop, photo: Image.Image) -> None:
    """spaces.GPU calls the duration with the arguments of the call it is about to run (self first)."""
    wide = photo.crop((0, 0, 512, 256))
    assert _render_duration(backdrop, wide, PROMPT, 1, None) == gpu_seconds(1, *backdrop.background_size(wide))
    assert _render_duration(two_step, photo, prompt=PROMPT, seed=1) == gpu_seconds(2, *two_step.background_size(photo))
    duration, render = inspect.signature(_render_duration), inspect.signature(Backdrop.render)
    assert list(duration.parameters)[1:] == list(render.parameters)[1:]  # keywords too: the same names


def test_a_tiny_autoencoder_decodes_in_place_of_the_vae_through_the_app(
    private_app, tiny_models: Path, photo: Image.Image
) -> None:
    from diffusers import AutoencoderTiny

    model = Backdrop(
        str(tiny_models / "segmentation"), str(tiny_models / "background"), vae_model=str(tiny_models / "vae-tiny")
    )
    assert isinstance(model.pipe.vae, AutoencoderTiny)
    _, background = model.render(photo, PROMPT, seed=4)
    assert background.size == model.background_size(photo)
    assert np.asarray(background).std() > 1
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    with running(private_app.create_app(model), private_app.serve, warm_up=False) as url:
        client = Client(url, token=False, verbose=False, download_files=False, ssl_verify=TLS)
        photo_b64 = base64.b64encode(buffer.getvalue()).decode()
        *pictures, status = client.predict(photo_b64, "casual", "male", api_name="/predict_api")
        client.close()
    assert status.startswith("Done in ")
    result = Image.open(io.BytesIO(base64.b64decode(pictures[2])))
    assert result.size == photo.size


def test_every_prompt_fits_the_text_encoders_77_tokens(private_app, tmp_path: Path) -> None:
    """With CLIP's real BPE vocabulary (scripts/data), which sd-turbo's OpenCLIP text encoder uses."""
    tokenizer = clip_tokenizer(tmp_path)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's own ids
    for category in private_app.CATEGORIES:
        for gender in private_app.GENDERS:
            ids = tokenizer(private_app.background_prompt(category, gender)).input_ids
            assert len(ids) <= tokenizer.model_max_length == 77, (category, gender, len(ids))


def test_the_tiny_pipeline_tokenizes_every_prompt_as_clip_does_without_truncating(
    private_app, tiny_models: Path, tmp_path: Path
) -> None:
    """The tiny models' tokenizer is CLIP's: a real prompt is not cut (and the pipeline logs no truncation)."""
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(tiny_models / "background")
    clip = clip_tokenizer(tmp_path)
    assert len(pipe.tokenizer) == len(clip) == pipe.text_encoder.config.vocab_size == 49408
    diffusers_log = logging.getLogger("diffusers")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # diffusers' own loggers do not propagate to pytest's
    diffusers_log.addHandler(handler)
    try:
        for category in private_app.CATEGORIES:
            for gender in private_app.GENDERS:
                prompt = private_app.background_prompt(category, gender)
                ids = pipe.tokenizer(prompt).input_ids
                assert ids == clip(prompt).input_ids
                assert len(ids) < 77, (category, gender, len(ids))  # all of it, BOS and EOS included
                pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)
    finally:
        diffusers_log.removeHandler(handler)
    assert not [record.getMessage() for record in records if "truncated" in record.getMessage()]


def test_same_seed_same_output_and_other_seed_other_background(backdrop: Backdrop, photo: Image.Image) -> None:
    classes_a, background_a = backdrop.render(photo, PROMPT, seed=7)
    classes_b, background_b = backdrop.render(photo, PROMPT, seed=7)
    _, background_c = backdrop.render(photo, PROMPT, seed=8)
    np.testing.assert_array_equal(classes_a, classes_b)
    np.testing.assert_array_equal(np.asarray(background_a), np.asarray(background_b))
    assert not np.array_equal(np.asarray(background_a), np.asarray(background_c))


@pytest.mark.parametrize("steps", [1, 2])
def test_progress_rises_and_reports_each_diffusion_step(
    backdrop: Backdrop, two_step: Backdrop, photo: Image.Image, tiny_models: Path, steps: int
) -> None:
    model = backdrop if steps == 1 else two_step
    calls: list[tuple[float, str]] = []

    def progress(fraction: float, *, desc: str) -> None:
        calls.append((fraction, desc))

    model.render(photo, PROMPT, seed=3, progress=progress)
    fractions = [fraction for fraction, _ in calls]
    assert fractions == sorted(fractions)
    assert all(0 < fraction <= 1 for fraction in fractions)
    step_calls = [desc for _, desc in calls if "step" in desc]
    assert step_calls == [f"Painting the backdrop (step {i} of {steps})" for i in range(1, steps + 1)]
    for _, desc in calls:
        assert desc[0].isupper()
        for secret in ("model", "segformer", "turbo", "stabilityai", "mattmdjaga", str(tiny_models), "/"):
            assert secret not in desc.lower()


def test_pickle_is_a_cheap_handle_to_the_live_instance(backdrop: Backdrop, two_step: Backdrop) -> None:
    payload = pickle.dumps(backdrop)
    assert len(payload) < 500  # the handle, not the weights
    assert pickle.loads(payload) is backdrop
    assert pickle.loads(pickle.dumps(two_step)) is two_step


def test_load_logs_device_and_dtype_but_no_model_path(tiny_models: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="backdrop"):
        Backdrop(str(tiny_models / "segmentation"), str(tiny_models / "background"))
    messages = [record.getMessage() for record in caplog.records if record.name == "backdrop"]
    assert len(messages) == 1
    device, dtype = ("cuda", "float16") if torch.cuda.is_available() else ("cpu", str(cpu_dtype())[6:])
    assert device in messages[0]
    assert dtype in messages[0]
    assert str(tiny_models) not in messages[0]
    assert "segmentation" not in messages[0]


def _render_in_fork(sender: Connection, payload: bytes) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's CPU thread pool (it would hang)
    model, image, prompt, seed = pickle.loads(payload)
    classes, background = model.render(image, prompt, seed)
    sender.send((classes, np.asarray(background)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA cannot be forked once initialised; ZeroGPU forks first")
def test_forked_worker_renders_through_the_pickled_handle(backdrop: Backdrop, photo: Image.Image) -> None:
    """What spaces.GPU does on ZeroGPU: pickle the call, fork, unpickle in the child, run there."""
    expected_classes, expected_background = backdrop.render(photo, PROMPT, seed=5)
    payload = pickle.dumps((backdrop, photo, PROMPT, 5))
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_render_in_fork, args=(sender, payload))
    worker.start()
    try:
        assert receiver.poll(30), "the forked worker did not answer"
        classes, background = receiver.recv()
    finally:
        worker.join(5)
        if worker.is_alive():
            worker.kill()
    assert worker.exitcode == 0
    np.testing.assert_array_equal(classes, expected_classes)
    np.testing.assert_array_equal(background, np.asarray(expected_background))
