"""The private Space's settings: each one's variable, default and meaning, defined here once.

app.py and backdrop.py take their constants from here; README.md's table is `SETTINGS.table()`
(tests/test_settings.py keeps it so), and scripts/deploy.py takes the defaults of the options it sets from here.
Variables and secrets reach the app as environment variables; changing one on the Space restarts it.
"""

from __future__ import annotations

from environment import Settings

SETTINGS = Settings()

SEGMENTATION_MODEL = SETTINGS.text(
    "SEGMENTATION_MODEL", "mattmdjaga/segformer_b2_clothes", "model id or folder of the clothes segmentation model"
)
BACKGROUND_MODEL = SETTINGS.text(
    "BACKGROUND_MODEL", "stabilityai/sd-turbo", "model id or folder of the text-to-image model for the backdrop"
)
BACKGROUND_STEPS = SETTINGS.count("BACKGROUND_STEPS", 1, "diffusion steps per backdrop")
VAE_MODEL = (
    SETTINGS.text(
        "VAE_MODEL",
        "",
        "a tiny autoencoder (`AutoencoderTiny`, e.g. `madebyollin/taesd`) that decodes instead of the full VAE: 22x "
        "faster decode, a CPU request 4x faster, slightly softer detail; unset on GPU",
    )
    or None
)
BACKGROUND_PIXELS = (
    SETTINGS.count(
        "BACKGROUND_PIXELS",
        0,
        "most pixels of the backdrop (never above the model's native size), the photo's aspect ratio kept: 98304 "
        "gives 384 x 256 for a 4:3 photo; `0`: native on GPU, 98304 on CPU",
    )
    or None
)
SEGMENTATION_SIZE = (
    SETTINGS.count(
        "SEGMENTATION_SIZE",
        0,
        "SegFormer's input side in pixels; 384 saves ~0.9 s a request on a 2-core CPU, at a quality cost not "
        "measured here; `0`: the processor's own (512)",
    )
    or None
)
CPU_DTYPE = SETTINGS.text(
    "CPU_DTYPE",
    "auto",
    "on CPU: `float32`, `bfloat16`, or `auto` (bfloat16 where the CPU has AVX512-BF16 or AMX units); float16 on GPU",
)
QUEUE_MAX_SIZE = SETTINGS.count("QUEUE_MAX_SIZE", 32, 'requests that may wait; one more gets "Queue is full"')
GPU_CONCURRENCY = SETTINGS.count(
    "GPU_CONCURRENCY",
    1,
    "GPU jobs at once; keep 1 on a dedicated GPU (the jobs would share one pipeline); `scripts/deploy.py` sets 2 on "
    "ZeroGPU hardware, where each runs in a worker process on a GPU of its own",
)
GPU_DURATION_S = SETTINGS.count(
    "GPU_DURATION_S",
    30,
    "the most ZeroGPU seconds one request reserves (on `zero-a10g` hardware); each request asks for what its steps "
    "and size need (`backdrop.gpu_seconds`, below)",
)
MAX_SIDE = SETTINGS.count("MAX_SIDE", 1024, "longest side, in pixels, a photo is scaled down to")
MAX_UPLOAD_MB = SETTINGS.number("MAX_UPLOAD_MB", 10, "largest photo accepted")
MAX_MEGAPIXELS = SETTINGS.number(
    "MAX_MEGAPIXELS", 40, "most pixels a photo may have; larger ones are refused from their header, never decoded"
)
BACKEND_TOKEN = SETTINGS.secret(
    "BACKEND_TOKEN",
    "when set, the bearer token every request must carry; `GET /metrics` with it gives the maintainer's figures "
    "(no route without it)",
)
