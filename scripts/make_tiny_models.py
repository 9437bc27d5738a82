"""Build tiny random-weight stand-ins for Backdrop's two models, offline and in seconds.

``python scripts/make_tiny_models.py --out DIR`` writes:

* ``DIR/segmentation``: a ``SegformerForSemanticSegmentation`` with the 18 labels of
  ``mattmdjaga/segformer_b2_clothes`` and its image processor (512 px, ImageNet normalisation, like the real one);
* ``DIR/background``: a ``StableDiffusionPipeline`` (tiny UNet, 2-block VAE, CLIP text encoder, a hand-written
  CLIP tokenizer vocabulary and ``EulerAncestralDiscreteScheduler``) that ``AutoPipelineForText2Image`` loads.
  Its native size is 128 px (UNet sample size 64 x VAE scale factor 2), not sd-turbo's 512.
* ``DIR/vae-tiny``: an ``AutoencoderTiny`` with the same latents and scale factor (2) as that pipeline's VAE, to
  load with ``VAE_MODEL`` in its place, as ``madebyollin/taesd`` replaces sd-turbo's.

Weights are random but seeded, so two runs write the same tensors. Both folders reload with the same
``from_pretrained`` calls as the real Hub weights; they exist so tests and local runs need neither the Hub nor a GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
)

SEED = 0

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

# A few whole words get merge chains, so the tokenizer does real BPE on typical prompts; anything else falls
# back to byte-level single characters, which are all in the vocabulary.
WORDS = ["a", "the", "of", "on", "and", "with", "beach", "sunset", "city", "night", "forest", "studio", "photo"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """Return a small CLIP vocabulary (token -> id) and its BPE merges, in CLIP's own layout."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[str] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_tokenizer() -> CLIPTokenizer:
    """Write vocab.json + merges.txt and load them (transformers 5 ignores vocab_file/merges_file arguments)."""
    vocab, merges = tokenizer_files()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


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
    tokenizer = build_tokenizer()
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
