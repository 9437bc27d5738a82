"""Build tiny random-weight stand-ins for Backdrop's two models, offline and in seconds.

``python scripts/make_tiny_models.py --out DIR`` writes:

* ``DIR/segmentation``: a ``SegformerForSemanticSegmentation`` with the 18 labels of
  ``mattmdjaga/segformer_b2_clothes`` and its image processor (512 px, ImageNet normalisation, like the real one);
* ``DIR/background``: a ``StableDiffusionPipeline`` (tiny UNet, 2-block VAE, CLIP text encoder (hidden size 16),
  CLIP's real 49408-token tokenizer (from ``scripts/data/clip-bpe-merges.txt.gz``, so prompts are tokenized and
  truncated as sd-turbo's are) and ``EulerAncestralDiscreteScheduler``) that ``AutoPipelineForText2Image`` loads.
  Its native size is 128 px (UNet sample size 64 x VAE scale factor 2), not sd-turbo's 512.
* ``DIR/vae-tiny``: an ``AutoencoderTiny`` with the same latents and scale factor (2) as that pipeline's VAE, to
  load with ``VAE_MODEL`` in its place, as ``madebyollin/taesd`` replaces sd-turbo's.

Weights are random but seeded, so two runs write the same tensors. Both folders reload with the same
``from_pretrained`` calls as the real Hub weights; they exist so tests and local runs need neither the Hub nor a GPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
)
from transformers.utils import logging as transformers_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "private_space"))  # the app's own no_torchvision
from no_torchvision import without_fallback_notices

with without_fallback_notices():  # diffusers' pipelines import names that need torchvision (no_torchvision.py)
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

SEED = 0
transformers_logging.disable_progress_bar()  # "Writing model shards" for each of these tiny files says nothing

# The label set of mattmdjaga/segformer_b2_clothes, in class-id order.
LABELS = [
    "Background",
    "Hat",
    "Hair",
    "Sunglasses",
    "Upper-clothes",
    "Skirt",
    "Pants",
    "Dress",
    "Belt",
    "Left-shoe",
    "Right-shoe",
    "Face",
    "Left-leg",
    "Right-leg",
    "Left-arm",
    "Right-arm",
    "Bag",
    "Scarf",
]

MERGES = Path(__file__).resolve().parent / "data" / "clip-bpe-merges.txt.gz"  # CLIP's own BPE (data/README.md)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable character table, in CLIP's order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write CLIP's vocab.json and merges.txt into `folder` (as OpenAI's SimpleTokenizer builds them) and load it.

    transformers 5 ignores `vocab_file`/`merges_file` arguments: the files must be in a folder.
    """
    text = gzip.decompress(MERGES.read_bytes()).decode("utf-8")
    merges = text.splitlines()[1:]
    alphabet = _bytes_to_unicode()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(m.replace(" ", "") for m in merges), BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    # OpenCLIP (SD 2.x, sd-turbo) pads with "!" (id 0); model_max_length is CLIP's 77 positions.
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")  # noqa: S106 (a token, no secret)


def build_segmentation(out: Path) -> None:
    """A two-stage Segformer with the real model's 18 labels, plus its image processor."""
    torch.manual_seed(SEED)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[8, 4],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    SegformerForSemanticSegmentation(config).eval().save_pretrained(out)
    save_image_processor(out)


def save_image_processor(out: Path) -> None:
    """The real model's image processor: 512 px, ImageNet normalisation, labels as they are."""
    processor = SegformerImageProcessorPil(
        size={"height": 512, "width": 512},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_reduce_labels=False,
    )
    processor.save_pretrained(out)


def build_background(out: Path) -> None:
    """A Stable Diffusion pipeline of tiny parts, scheduled like sd-turbo (trailing timesteps, 1 to 4 steps)."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        sample_size=128,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
    )
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = clip_tokenizer(Path(folder))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    save_pipeline(out, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def save_pipeline(out: Path, **components: Any) -> None:
    """Save a text-to-image pipeline of these components as AutoPipelineForText2Image loads it (no safety checker)."""
    components["text_encoder"].eval()
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(out)


def build_vae_tiny(out: Path) -> None:
    """A two-block AutoencoderTiny: 4 latent channels and scale factor 2, like the tiny pipeline's VAE."""
    torch.manual_seed(SEED)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).save_pretrained(out)


def folder_size(path: Path) -> int:
    """Total bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_all(out: Path, builds: dict[str, Callable[[Path], None]], *, unit: tuple[str, float] = ("MB", 1e6)) -> None:
    """Build each model into `out/NAME`, saying its size on disk and how long it took."""
    name_of_unit, size_of_unit = unit
    for name, build in builds.items():
        start = time.perf_counter()
        target = out / name
        build(target)
        size = folder_size(target) / size_of_unit
        print(f"wrote {target} ({size:.2f} {name_of_unit}) in {time.perf_counter() - start:.2f} s")


def main(argv: list[str] | None = None) -> None:
    """Parse ``--out`` and write the tiny models under it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write segmentation/ and background/ into")
    args = parser.parse_args(argv)
    build_all(
        args.out,
        {"segmentation": build_segmentation, "background": build_background, "vae-tiny": build_vae_tiny},
    )


if __name__ == "__main__":
    main()
