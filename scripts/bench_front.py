"""Benchmark the public front's own CPU: what one relayed request costs it, beside a plain Gradio app.

    python scripts/bench.py front [--callers 24] [--requests 48] [--service-time 0.5] [--rounds 2] [--profile DIR]
                                  [--jpeg] [--root DIR]

Every visitor here does what a browser does: upload the photo, join the queue, read the event stream to its end,
fetch the two pictures (async httpx, cheap, so that the callers leave the front's core to the front). Each visit
comes from an address of its own (the X-Forwarded-For entry a proxy appends; the front believes one hop). The
photo is the 512-px example, or with --jpeg a 1024×768 JPEG. --root runs another checkout's apps (and its
stand-in) under this same harness.
1. CPU per request, side by side in one run: the front (public_space/app.py in front of the private app around
   the stand-in, S seconds per job) and a plain Gradio app with the same components whose endpoint sleeps S and
   returns two pictures of the backend's size, on Gradio's defaults (one job at a time: its visitors wait in its
   queue as the front's wait in the backend's, for the same makespan). N visitors at once, `--requests` in all,
   CPU time (user + system) of the server process over the load; the pair is measured `--rounds` times,
   alternating, and the ratio printed.
2. The front's maximum requests per second in front of a zero-time backend: N visitors, each starting its next
   request as soon as its last one is done; and its CPU per request there.
With --profile DIR, py-spy samples the front during the first round (DIR/front.txt, collapsed stacks).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from bench import FRONT_CORES, PHOTO, ROOT, commit_of, free_port, photo_file, start, start_stack
from bench_visits import Front, Visit
from PIL import Image


def picture_bytes() -> bytes:
    """One picture as the backend sends it: the 512×512 portrait as WebP."""
    buffer = io.BytesIO()
    Image.open(PHOTO).convert("RGB").save(buffer, format="WEBP", quality=90)
    return buffer.getvalue()


def serve_plain(port: int, service_time: float) -> None:
    """Child process: a plain Gradio app, the front's components, an endpoint that sleeps and returns two files."""
    import tempfile

    import gradio as gr

    picture, folder = picture_bytes(), Path(tempfile.mkdtemp(prefix="plain-"))

    async def predict_api(image: str, category: str, gender: str) -> tuple[str, str, str]:
        await asyncio.sleep(service_time)
        made = []
        for name in ("overlay", "result"):
            path = folder / f"{name}-{time.monotonic_ns()}.webp"
            path.write_bytes(picture)
            made.append(str(path))
        return made[0], made[1], "Done"

    with gr.Blocks() as demo:
        photo = gr.Image(type="filepath")
        category = gr.Dropdown(["casual", "formal"], value="casual")
        gender = gr.Radio(["male", "female"], value="male")
        run = gr.Button("Run")
        overlay, result, status = gr.Image(type="filepath"), gr.Image(type="filepath"), gr.Markdown()
        run.click(predict_api, [photo, category, gender], [overlay, result, status], api_name="predict_api")
    demo.queue()  # Gradio's defaults: one job at a time, the others wait in its queue and are told their place
    demo.launch(server_name="127.0.0.1", server_port=port, quiet=True, prevent_thread_lock=True, max_threads=256)
    demo.block_thread()


def upload_of(photo: Path) -> tuple[str, bytes, str]:
    """The photo as a page uploads it: (name, content, type)."""
    return photo.name, photo.read_bytes(), "image/jpeg" if photo.suffix == ".jpg" else "image/png"


VISITS = itertools.count()


async def visit(front: Front) -> int:
    """One visitor's request as a browser makes it (bench_visits.py), from an address of its own: the status lines
    it was sent."""
    record = await front.visit(Visit(next(VISITS)))
    if record.error is not None:
        raise RuntimeError(f"a request failed: {record.error}")
    return len(record.statuses)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def burst(
    url: str, callers: int, requests: int, process: psutil.Process, photo: Path = PHOTO
) -> tuple[float, float, float]:
    """`requests` visits, `callers` at a time, after a warm-up: (CPU seconds of the server, wall seconds, updates
    a visitor was sent on average)."""
    upload = upload_of(photo)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=4 * callers)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        front = Front(url, http, upload)
        await asyncio.gather(*(visit(front) for _ in range(4)))  # warm both paths
        cpu, started = cpu_seconds(process), time.monotonic()
        left, updates = requests, 0

        async def caller() -> None:
            nonlocal left, updates
            while left > 0:
                left -= 1
                updates += await visit(front)

        await asyncio.gather(*(caller() for _ in range(callers)))
        return cpu_seconds(process) - cpu, time.monotonic() - started, updates / requests


def start_plain(service_time: float) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, __file__, "--serve-plain", str(port), "--service-time", str(service_time)]
    return url, start(command, {"GRADIO_ANALYTICS_ENABLED": "False"}, f"{url}config", FRONT_CORES)


def profiled(pid: int, out: Path) -> subprocess.Popen:
    out.parent.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "--pid", str(pid), "-o", str(out), "--rate", "200", "--nonblocking"]
    if out.suffix == ".txt":
        command += ["--format", "raw"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def side_by_side(args: argparse.Namespace, token: str) -> None:
    """CPU per request: the front and the plain app, alternating, `rounds` times each."""
    _, front, processes = start_stack(args.service_time, token, root=args.root)
    plain, plain_process = start_plain(args.service_time)
    processes.append(plain_process)
    try:
        ratios = []
        for round_ in range(args.rounds):
            spy = profiled(processes[1].pid, args.profile / "front.txt") if args.profile and not round_ else None
            front_process = psutil.Process(processes[1].pid)
            cpu_front, wall_front, updates_front = asyncio.run(
                burst(front, args.callers, args.requests, front_process, args.photo)
            )
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait()
            plain_process_ = psutil.Process(plain_process.pid)
            cpu_plain, wall_plain, _ = asyncio.run(
                burst(plain, args.callers, args.requests, plain_process_, args.photo)
            )
            per_front, per_plain = 1000 * cpu_front / args.requests, 1000 * cpu_plain / args.requests
            ratios.append(per_front / per_plain)
            print(
                f"round {round_ + 1}: CPU per request, front {per_front:.0f} ms ({wall_front:.1f} s wall, "
                f"{updates_front:.1f} status updates per visitor), plain Gradio app {per_plain:.0f} ms "
                f"({wall_plain:.1f} s wall): {ratios[-1]:.2f}×"
            )
        print(f"front / plain CPU per request: {', '.join(f'{r:.2f}' for r in ratios)}")
    finally:
        for process in processes:
            process.kill()


def max_rate(args: argparse.Namespace, token: str) -> None:
    _, front, processes = start_stack(0.0, token, root=args.root)
    try:
        requests = max(args.requests, 4 * args.callers)
        front_process = psutil.Process(processes[1].pid)
        cpu, wall, _ = asyncio.run(burst(front, args.callers, requests, front_process, args.photo))
    finally:
        for process in processes:
            process.kill()
    print(
        f"zero-time backend, {args.callers} visitors back to back: {requests / wall:.1f} requests/s "
        f"({requests} in {wall:.1f} s), front CPU {1000 * cpu / requests:.0f} ms per request "
        f"(a core's ceiling: {requests / cpu:.1f}/s)"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py front", description=__doc__)
    parser.add_argument("--callers", type=int, default=24, help="visitors at once (N)")
    parser.add_argument("--requests", type=int, default=48, help="requests per measured burst")
    parser.add_argument("--service-time", type=float, default=0.5, help="the stand-in's seconds per job (S)")
    parser.add_argument("--rounds", type=int, default=2, help="front/plain pairs measured")
    parser.add_argument("--profile", type=Path, help="write a py-spy flame graph of the front here")
    parser.add_argument("--skip-rate", action="store_true", help="leave out the zero-time maximum rate")
    parser.add_argument("--jpeg", action="store_true", help="send a 1024×768 JPEG instead of the 512-px example")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose apps run (default: this one)")
    parser.add_argument("--serve-plain", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_plain:
        serve_plain(args.serve_plain, args.service_time)
        return
    args.root, args.photo = args.root.resolve(), photo_file(args.jpeg)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.sched_setaffinity(0, FRONT_CORES)
    print(
        f"apps of {args.root} (git {commit_of(args.root)}); photo {args.photo.name}; load average "
        f"{os.getloadavg()[0]:.2f}; front, plain app and callers on cores {sorted(FRONT_CORES)}"
    )
    token = secrets.token_urlsafe(16)
    side_by_side(args, token)
    if not args.skip_rate:
        max_rate(args, token)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "scripts"))
    main(sys.argv[1:])
