"""Benchmark the waits visitors are told: the first ETA each one's status line showed, against their result.

    python scripts/bench.py etas [--rounds 1] [--sizes 1,8,24] [--full-size DIR] [--full-size-callers 4]

1. With the stand-in (S = 0.5 s, the private app on a core of its own, the public app in front): N callers at
   once through the public app, for each N in `--sizes`, `--rounds` times (bursts repeated until 6 callers were
   measured): the median of |first ETA shown - actual finish| / actual wait, over the callers that were shown one,
   and the median of the signed error (+: told too long).
2. With --full-size DIR (built by scripts/make_full_size_models.py if missing): the private app's own entry point
   on those folders (taesd as VAE_MODEL) on CPU, warmed up, then `--full-size-callers` callers at once through
   the public app: each caller's first ETA, actual wait and error, and the median error of those who were shown
   one. The figure is a ratio, so it holds whatever the service time (a faster backend gives shorter waits).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    BACKEND_CORES,
    FRONT_CORES,
    ROOT,
    SSL,
    Caller,
    eta_error,
    free_port,
    photo_1024x768,
    run_callers,
    shown_wait,
    start,
)

MIN_SAMPLES = 6  # callers measured per N at the least


def first_eta(record: Caller) -> tuple[float, float] | None:
    """(when the first ETA was shown, the seconds it said), or None if the caller was never shown one."""
    return next(((at, wait) for at, text in record.statuses if (wait := shown_wait(text)) is not None), None)


def caller_of(photo_path: str) -> Callable[[Any], Caller]:
    """A caller through the public app that records each status line as it arrives."""
    from gradio_client import handle_file

    def call(client: Any) -> Caller:
        record = Caller(submitted=time.monotonic())
        for output in client.submit(handle_file(photo_path), "casual", "male", api_name="/predict_api"):
            record.statuses.append((time.monotonic(), output[2]))
        record.finished = time.monotonic()
        return record

    return call


def small_waits(token: str, photo_path: str, sizes: list[int], rounds: int, service_time: float) -> None:
    from bench import start_stack
    from gradio_client import Client

    call = caller_of(photo_path)
    _, front, processes = start_stack(service_time, token)
    try:
        for round_ in range(rounds):
            for callers in sizes:
                clients = [Client(front, token=False, verbose=False, ssl_verify=SSL) for _ in range(callers)]
                call(clients[0])  # warm: the stage times come from real requests
                records = []
                for _ in range(-(-MIN_SAMPLES // callers)):  # a lone caller is one sample: a few bursts then
                    records += run_callers(clients, call)[0]
                shown = [(r, first_eta(r)) for r in records]
                errors = [eta_error(r) for r, eta in shown if eta]
                signed = [(at + eta - r.finished) / (r.finished - at) for r, (at, eta) in shown if eta]
                median = 100 * statistics.median(errors) if errors else float("nan")
                bias = 100 * statistics.median(signed) if signed else float("nan")
                print(
                    f"round {round_ + 1}, S = {service_time} s, N = {callers}: median first-ETA error "
                    f"{median:.1f} % (median signed {bias:+.1f} %, n={len(errors)}; "
                    f"load average {os.getloadavg()[0]:.1f})"
                )
    finally:
        for process in processes:
            process.kill()


def full_size(token: str, photo_path: str, models: Path, callers: int) -> None:
    from gradio_client import Client

    if not (models / "vae-tiny").exists():
        script = ROOT / "scripts" / "make_full_size_models.py"
        subprocess.run([sys.executable, str(script), "--out", str(models)], check=True)
    back_port, front_port = free_port(), free_port()
    back, front = f"http://127.0.0.1:{back_port}/", f"http://127.0.0.1:{front_port}/"
    quiet = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    models_env = {
        "SEGMENTATION_MODEL": str(models / "segmentation"),
        "BACKGROUND_MODEL": str(models / "background"),
        "VAE_MODEL": str(models / "vae-tiny"),
    }
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115 - read after the run
    backend = subprocess.Popen(
        [sys.executable, str(ROOT / "private_space" / "app.py")],
        env={**os.environ, **quiet, **models_env, "BACKEND_TOKEN": token, "GRADIO_SERVER_PORT": str(back_port)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    processes = [backend]
    try:
        deadline = time.monotonic() + 900
        while "Warm-up done" not in Path(log.name).read_text() and time.monotonic() < deadline:
            if backend.poll() is not None:
                raise SystemExit(f"the private app stopped: see {log.name}")
            time.sleep(1)
        front_env = {**quiet, "BACKEND": back, "HF_TOKEN": token, "GRADIO_SERVER_PORT": str(front_port)}
        front_env |= {"MAX_JOBS_PER_VISITOR": "0", "VISITOR_RATE": ""}
        processes.append(start([sys.executable, str(ROOT / "public_space" / "app.py")], front_env, front, FRONT_CORES))
        call = caller_of(photo_path)
        clients = [Client(front, token=False, verbose=False, ssl_verify=SSL) for _ in range(callers)]
        started = time.monotonic()
        records, _ = run_callers(clients, call)
    finally:
        for process in processes:
            process.kill()
    errors = []
    for record in sorted(records, key=lambda r: r.finished):
        shown = first_eta(record)
        finish = record.finished - started
        if shown is None:
            print(f"  finished at {finish:.1f} s, shown no ETA")
            continue
        shown_at, eta = shown
        errors.append(eta_error(record))
        wait = record.finished - shown_at
        print(
            f"  finished at {finish:.1f} s: told {eta:.1f} s at {shown_at - started:.1f} s for a wait of "
            f"{wait:.1f} s ({100 * (eta - wait) / wait:+.0f} %)"
        )
    median = 100 * statistics.median(errors) if errors else float("nan")
    print(f"full size on CPU, {callers} callers at once: median first-ETA error {median:.1f} % (n={len(errors)})")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py etas", description=__doc__)
    parser.add_argument("--rounds", type=int, default=1, help="repeats of the stand-in sizes")
    parser.add_argument("--sizes", default="1,8,24", help="callers at once (N), comma-separated")
    parser.add_argument("--service-time", type=float, default=0.5, help="the stand-in's seconds per job (S)")
    parser.add_argument("--full-size", type=Path, metavar="DIR", help="also run the full-size CPU backend")
    parser.add_argument("--full-size-callers", type=int, default=4)
    parser.add_argument("--skip-stand-in", action="store_true", help="only the full-size run")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.sched_setaffinity(0, FRONT_CORES)
    token = secrets.token_urlsafe(16)
    print(f"backend on cores {sorted(BACKEND_CORES)}, front and callers on {sorted(FRONT_CORES)}")
    with tempfile.NamedTemporaryFile(suffix=".jpg") as photo:
        photo.write(photo_1024x768())
        photo.flush()
        if not args.skip_stand_in:
            sizes = [int(size) for size in args.sizes.split(",")]
            small_waits(token, photo.name, sizes, args.rounds, args.service_time)
        if args.full_size:
            full_size(token, photo.name, args.full_size, args.full_size_callers)


if __name__ == "__main__":
    main(sys.argv[1:])
