"""Time one 1024x768 request stage by stage on full-size random-weight models, on this machine's CPU.

    python scripts/bench.py models --full-size DIR [--runs 2] [--app both|full|tiny|none] [--device cpu|cuda]
    python scripts/bench.py models --full-size DIR --compare ROOT   # ROOT: a checkout of main, say

With --compare, only the app with taesd: ROOT's private_space/app.py, then this checkout's, one after the other
in this one run, and the ratio of their times and peak RSS (the load average before and after). With --device
cuda (on a machine with a CUDA GPU) the stages run in float16 and are printed in milliseconds, and each app run
adds 8 jobs submitted at once at GPU_CONCURRENCY 1: requests per second with a queue.

DIR holds what `scripts/make_full_size_models.py --out DIR` writes (built there first if missing): SegFormer-B2 and
sd-turbo at their real sizes, random weights, plus taesd's AutoencoderTiny. Prints, from one run:
- in this process, with the real `backdrop.Backdrop` (its defaults for the device) and timers around each model call:
  segmentation, text encoding, each UNet step, the decode (full VAE, then AutoencoderTiny via `vae_model`), the
  rest of the pipeline, the app's compositing (overlay + composite) and the WebP encoding of its three pictures;
  the last of `--runs` renders counts (the first warms the CPU kernels up);
- the private app itself (`private_space/app.py` on these folders, unchanged; with the full VAE, then with
  `VAE_MODEL` set to the tiny one): its warm-up, one `predict_api` call with the 1024x768 JPEG, its peak RSS
  from start.
Everything runs at `nice` 10: the machine is shared. Expect several minutes and about 7 GB of memory.
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import os
import resource
import secrets
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import psutil
from bench import API, PHOTO, ROOT, SSL, Sampler, free_port
from PIL import Image

PROMPT_CHOICE = ("casual", "female")


def jpeg_request() -> str:
    """The example photo as a 1024x768 JPEG, base64: the size the app's MAX_SIDE lets through."""
    with Image.open(PHOTO) as image:
        photo = image.convert("RGB").resize((1024, 768), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a stage's wall time is its own (nothing on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StageTimer:
    """Wall time of each call to the wrapped callables, by stage name."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def wrap(self, owner: object, attribute: str, stage: str) -> None:
        original: Callable[..., object] = getattr(owner, attribute)

        def timed(*args: object, **kwargs: object) -> object:
            synchronize()
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize()
                self.times[stage].append(time.perf_counter() - started)

        setattr(owner, attribute, timed)  # an instance attribute: shadows the method for this object only

    def clear(self) -> None:
        self.times.clear()


def time_stages(models: Path, runs: int, vae_model: str | None) -> tuple[dict[str, float], tuple[int, int]]:
    """Load Backdrop as the app does, render the 1024x768 photo `runs` times; the last run's stage times and the
    background's size."""
    sys.path[:0] = [str(ROOT / "private_space")]
    import app
    from backdrop import Backdrop
    from imaging import composite, decode_photo, encode_photo, overlay

    started = time.perf_counter()
    model = Backdrop(str(models / "segmentation"), str(models / "background"), vae_model=vae_model)
    load_s = time.perf_counter() - started
    timer = StageTimer()
    timer.wrap(model.processor, "preprocess", "segmentation")
    timer.wrap(model.segmenter, "forward", "segmentation")
    timer.wrap(model.processor, "post_process_semantic_segmentation", "segmentation")
    timer.wrap(model.pipe.text_encoder, "forward", "text encoding")
    timer.wrap(model.pipe.unet, "forward", "UNet step")
    timer.wrap(model.pipe.vae, "decode", "decode")
    request = jpeg_request()
    for _ in range(runs):
        timer.clear()
        started = time.perf_counter()
        photo = decode_photo(request, max_bytes=10 * 2**20, max_pixels=40_000_000, max_side=1024)
        timer.times["decoding the JPEG"].append(time.perf_counter() - started)
        started = time.perf_counter()
        class_map, background = model.render(photo.image, app.background_prompt(*PROMPT_CHOICE), seed=1)
        render_s = time.perf_counter() - started
        started = time.perf_counter()
        pictures = [overlay(photo.image, class_map, 18), composite(photo.image, class_map, background)]
        timer.times["compositing (overlay + composite)"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for picture in [*pictures, photo.image]:
            encode_photo(picture)
        timer.times["WebP encoding, 3 pictures in series"].append(time.perf_counter() - started)
    stages = {stage: sum(times) for stage, times in timer.times.items()}
    in_model = sum(stages[s] for s in ("segmentation", "text encoding", "UNet step", "decode"))
    stages["rest of the pipeline (scheduler, tensor -> image)"] = render_s - in_model
    stages["render (all model work)"] = render_s
    stages["loading the models"] = load_s
    stages["dtype"] = str(model.dtype).removeprefix("torch.")
    del model
    gc.collect()
    return stages, background.size


def run_app(models: Path, vae_model: str | None, root: Path = ROOT, waiting: int = 0) -> tuple[float, float]:
    """The private app's own entry point (`root`/private_space/app.py) on the folders: warm-up, one 1024x768 JPEG
    call, peak RSS from start (sampled every 0.1 s); with `waiting`, that many jobs submitted at once after it
    (GPU_CONCURRENCY 1: requests per second with a queue). Returns (seconds of the call, peak RSS in GiB)."""
    from gradio_client import Client

    token, port = secrets.token_urlsafe(16), free_port()
    env = {
        **os.environ,
        "SEGMENTATION_MODEL": str(models / "segmentation"),
        "BACKGROUND_MODEL": str(models / "background"),
        "VAE_MODEL": vae_model or "",
        "BACKEND_TOKEN": token,
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GPU_CONCURRENCY": "1",
    }
    command = [sys.executable, str(root / "private_space" / "app.py")]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Sampler(psutil.Process(process.pid)) as rss:
            warm_up = "(no warm-up line)"
            for line in process.stdout:
                if "Warm-up done in" in line or "Warm-up failed" in line:
                    warm_up = line.split(": ", 1)[-1].strip()
                    break
            ready_s = time.perf_counter() - started
            url = f"http://127.0.0.1:{port}/"
            client = Client(url, token=token, verbose=False, download_files=False, ssl_verify=SSL)
            request = jpeg_request()
            started = time.perf_counter()
            status = client.predict(request, *PROMPT_CHOICE, api_name=API)[3]
            took = time.perf_counter() - started
            if waiting:
                started = time.perf_counter()
                jobs = [client.submit(request, *PROMPT_CHOICE, api_name=API) for _ in range(waiting)]
                for job in jobs:
                    job.result()
                queue_s = time.perf_counter() - started
            client.close()
    finally:
        process.kill()
        process.wait()
    which = "AutoencoderTiny" if vae_model else "full VAE"
    print(f"\nthe private app ({root / 'private_space' / 'app.py'} on {models}, {which}):")
    print(f"  start + warm-up (384x384 photo): {ready_s:.1f} s; {warm_up}")
    print(f"  one predict_api call, 1024x768 JPEG: {1000 * took:.0f} ms at the caller ({status})")
    if waiting:
        print(f"  {waiting} jobs at once, GPU_CONCURRENCY 1: {waiting / queue_s:.2f} requests/s ({queue_s:.1f} s)")
    peak = max(rss.samples) / 2**30
    print(f"  peak RSS, from start: {peak:.2f} GiB")
    return took, peak


def compare(models: Path, other: Path) -> None:
    """Today's app at `other` (a checkout of main, say) and this checkout's, one after the other, with taesd."""
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    before = run_app(models, str(models / "vae-tiny"), other)
    after = run_app(models, str(models / "vae-tiny"))
    print(f"\nthis checkout / {other}: time {after[0] / before[0]:.0%}, peak RSS {after[1]:.2f} / {before[1]:.2f} GiB")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="bench.py models", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full-size", type=Path, required=True, metavar="DIR", help="full-size model folders")
    parser.add_argument("--compare", type=Path, metavar="ROOT", help="only the app, ROOT's then this checkout's")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: fp16 stages, the app, req/s")
    parser.add_argument("--runs", type=int, default=2, help="renders per decoder; the last one is reported")
    parser.add_argument(
        "--app", choices=("both", "full", "tiny", "none"), default="both", help="the app itself, with which decoder"
    )
    args = parser.parse_args(argv)
    os.nice(10)
    models = args.full_size
    if not (models / "background").exists():
        build = [sys.executable, str(ROOT / "scripts" / "make_full_size_models.py"), "--out", str(models)]
        subprocess.run(build, check=True)

    if args.compare:
        compare(models, args.compare)
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{where}, torch {torch.__version__} with {torch.get_num_threads()} threads")
    full, size = time_stages(models, args.runs, None)
    tiny, _ = time_stages(models, args.runs, str(models / "vae-tiny"))
    print(f"one 1024x768 JPEG request, background {size[0]}x{size[1]}, 1 step, in {tiny.pop('dtype')}:")
    full.pop("dtype")
    print(f"  {'stage':52} {'full VAE':>10} {'taesd':>10}")
    for stage, seconds in full.items():
        print(f"  {stage:52} {1000 * seconds:8.0f}ms {1000 * tiny[stage]:8.0f}ms")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  peak RSS of this process (both loads, one after the other): {peak:.2f} GiB")
    waiting = 8 if args.device == "cuda" else 0
    if args.app in ("both", "full"):
        run_app(models, None, waiting=waiting)
    if args.app in ("both", "tiny"):
        run_app(models, str(models / "vae-tiny"), waiting=waiting)
