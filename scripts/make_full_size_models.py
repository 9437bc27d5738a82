"""Build random-weight models with the real default models' architectures, offline, for sizing and timing.

``python scripts/make_full_size_models.py --out DIR`` writes, as ``make_tiny_models.py`` does but full size:

* ``DIR/segmentation``: SegFormer-B2 (``nvidia/mit-b2`` encoder) with the 18 labels of
  ``mattmdjaga/segformer_b2_clothes`` and its image processor;
* ``DIR/background``: sd-turbo's ``StableDiffusionPipeline``: the SD 2.1 UNet (sample size 64, i.e. 512 px), the
  SD VAE, the OpenCLIP ViT-H text encoder (23 layers, as SD 2 uses it), CLIP's real 49408-token BPE tokenizer
  (from ``scripts/data/clip-bpe-merges.txt.gz``) and sd-turbo's ``EulerDiscreteScheduler`` (trailing timesteps);
* ``DIR/vae-tiny``: ``madebyollin/taesd``'s ``AutoencoderTiny`` (for ``VAE_MODEL``).

The weights are random (seeded) and stored in float16 (2.6 GB on disk instead of 5.2), which the app loads as
float32 on CPU; a random model costs the same to run as a trained one: timings and memory carry over, pictures don't.
Building took 28 s and 3.6 GiB of memory on a 2-core machine. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from make_tiny_models import LABELS, SEED, build_all, clip_tokenizer, save_image_processor, save_pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    SegformerConfig,
    SegformerForSemanticSegmentation,
)


def build_segmentation(out: Path) -> None:
    """SegFormer-B2 as mattmdjaga/segformer_b2_clothes configures it."""
    torch.manual_seed(SEED)
    config = SegformerConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[64, 128, 320, 512],
        num_attention_heads=[1, 2, 5, 8],
        sr_ratios=[8, 4, 2, 1],
        mlp_ratios=[4, 4, 4, 4],
        decoder_hidden_size=768,
        layer_norm_eps=1e-6,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    SegformerForSemanticSegmentation(config).eval().half().save_pretrained(out)
    save_image_processor(out)


def build_background(out: Path) -> None:
    """sd-turbo: each part built, halved to float16 and kept until the pipeline is saved (about 2.6 GB)."""
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    ).half()
    vae = AutoencoderKL(
        sample_size=768,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        scaling_factor=0.18215,
    ).half()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = clip_tokenizer(Path(folder))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            layer_norm_eps=1e-5,
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
        )
    ).half()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="trailing",
        steps_offset=1,
    )
    save_pipeline(out, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_vae_tiny(out: Path) -> None:
    """madebyollin/taesd: AutoencoderTiny's defaults (64-channel blocks, 4 latent channels, scaling factor 1)."""
    torch.manual_seed(SEED)
    AutoencoderTiny(latent_channels=4).half().save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    """Parse ``--out`` and write the three full-size models under it, with their size and build time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the models into")
    args = parser.parse_args(argv)
    builds = {"segmentation": build_segmentation, "background": build_background, "vae-tiny": build_vae_tiny}
    build_all(args.out, builds, unit=("GB", 1e9))


if __name__ == "__main__":
    main()
