"""Benchmark the private Space the way production runs it: real photo sizes, a fresh session per request.

    python scripts/bench.py traffic [--service-time 0.15] [--callers 24] [--requests 1000]

1. GPU use: the private app (its own process, one core) around the stand-in pipeline that holds the "GPU" for
   S seconds, N simultaneous callers each in a session of its own (the relay's own code calls it, as in
   production), each sending a 1024×768 JPEG. Prints makespan / (N·S), the median error of the first ETA each
   caller got, the response size, and the CPU time per job outside the GPU section, stage by stage.
2. ETAs at small waits: through the public app, S = 0.5 s, N = 1, 8 and 24 callers: the median error of the
   first wait each caller's status line showed ("about 0.6 s"), against when its result came.
3. Memory: both apps (the public one in front of the private one), `--requests` requests through the front, each
   from a new session and visitor address, the two pictures fetched as a browser would. Prints each app's RSS at
   request 100 and at the end, and the peak of what the front keeps on disk against its quota (`--quota-mb`,
   small by default so that the least recently used files must go).
4. With --restart-every K (issue 20.5): memory across backend restarts. The same `--requests` requests (8 at a
   time, S seconds each) twice, side by side: with no restart, and with the backend stopped (SIGTERM) and started
   again at once every K requests, while a batch is in flight (its jobs are sent again). Prints both apps' RSS at
   request 104 (the end of the 100th's batch), after each restart's batch and at the end, in each run (the
   front's is what matters: it outlives the restarts; the backend's restarts fresh), the requests that got no
   result, and what the front counted (jobs sent again, jobs lost). The front's kept files under `--quota-mb`, as
   in part 3 (else they would all be kept for KEEP_FILES_S, longer than the run). With it, parts 1-3 do not run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from bench import (
    BACKEND_CORES,
    ROOT,
    SSL,
    Caller,
    PhotoBytes,
    eta_error,
    photo_1024x768,
    run_callers,
    start_front,
    start_stack,
)
from bench_restart import BackendProcess
from bench_visits import Front, Visit, errors, figure, metrics

sys.path[:0] = [str(ROOT / "public_space"), str(ROOT / "private_space")]


async def one_caller(backend: object, photo: bytes) -> tuple[float | None, float, int]:
    """(first ETA's error, actual finish, response size) for one request in a session of its own.

    The error is |predicted - actual finish| / the actual wait from when the ETA arrived.
    """
    from relay import Finished, Queued

    first = None
    async for update in backend.predict(PhotoBytes(photo), "casual", "female"):
        if isinstance(update, Queued) and first is None and update.eta is not None:
            first = update
        if isinstance(update, Finished):
            finish = time.monotonic()
            error = None if first is None else abs(first.received + first.eta - finish) / (finish - first.received)
            size = sum(len(part) for part in (update.image_b64, update.overlay_b64, update.result_b64))
            return error, finish, size
    raise RuntimeError("no result")


async def gpu_use(url: str, token: str, callers: int, service_time: float, photo: bytes) -> None:
    from pool import Backends

    backend = Backends.connect([url], token)
    for _ in range(3):  # warm: the backend's stage times now come from real requests
        await one_caller(backend, photo)
    started = time.monotonic()
    results = await asyncio.gather(*(one_caller(backend, photo) for _ in range(callers)))
    finishes = [finish for _, finish, _ in results]
    makespan = max(finishes) - started
    ideal = callers * service_time
    print(f"makespan / (N·S), N = {callers}, S = {service_time} s: {makespan / ideal:.3f}  ({makespan:.2f} s)")
    errors = [error for error, _, _ in results if error is not None]
    median = 100 * statistics.median(errors)
    print(f"median |first ETA - actual finish| / actual wait: {median:.1f} %  (n={len(errors)} of {callers})")
    print(f"response size (three pictures, base64): {results[0][2] / 1000:.0f} kB")


def small_waits(token: str, photo: bytes, service_time: float = 0.5, sizes: tuple[int, ...] = (1, 8, 24)) -> None:
    """The first wait shown in the public status line against the actual finish, N callers at once."""
    from gradio_client import Client, handle_file

    with tempfile.NamedTemporaryFile(suffix=".jpg") as file:
        file.write(photo)
        file.flush()

        def call(client: Client) -> Caller:
            record = Caller(submitted=time.monotonic())
            for output in client.submit(handle_file(file.name), "casual", "male", api_name="/predict_api"):
                record.statuses.append((time.monotonic(), output[2]))
            record.finished = time.monotonic()
            return record

        _, front, processes = start_stack(service_time, token)
        try:
            for callers in sizes:
                clients = [Client(front, token=False, verbose=False, ssl_verify=SSL) for _ in range(callers)]
                call(clients[0])  # warm: the backend's stage times come from real requests
                records, _ = run_callers(clients, call)
                errors = [eta_error(r) for r in records if any("about" in text for _, text in r.statuses)]
                median = 100 * statistics.median(errors)
                print(f"S = {service_time} s, N = {callers}: median first-ETA error {median:.1f} % (n={len(errors)})")
        finally:
            for process in processes:
                process.kill()


def cpu_stages(photo: bytes, repeats: int = 20) -> None:
    """The private app's own CPU work per job, outside the GPU section, at 1024×768 (one core, in this process)."""
    from standin import StandInPipeline

    import imaging

    photo_b64 = base64.b64encode(photo).decode()
    limits = {"max_bytes": 10 * 2**20, "max_pixels": 40_000_000, "max_side": 1024}
    image = imaging.decode_photo(photo_b64, **limits).image
    class_map, background = StandInPipeline().render(image, "", 0)
    background = background.resize((576, 448))  # the backdrop size for a 4:3 photo
    pictures = [imaging.overlay(image, class_map, 18), imaging.composite(image, class_map, background)]
    stages = {
        "decode": lambda: imaging.decode_photo(photo_b64, **limits),
        "overlay": lambda: imaging.overlay(image, class_map, 18),
        "composite": lambda: imaging.composite(image, class_map, background),
        "encode overlay + result": lambda: [imaging.encode_photo(picture) for picture in pictures],
    }
    for name, stage in stages.items():
        started = time.perf_counter()
        for _ in range(repeats):
            stage()
        print(f"  CPU per job, {name}: {1000 * (time.perf_counter() - started) / repeats:.1f} ms")


async def soak(
    front: str, requests: int, photo: bytes, processes: dict[str, psutil.Process], *, kept: Path, quota_mb: float
) -> None:
    """`requests` visitors through the front, a few at a time, each a new session with an address of its own;
    also what the front keeps on disk (its cache folder `kept`) against its quota."""
    rss: dict[str, list[int]] = {name: [] for name in processes}
    done = 0
    peak = 0

    async def visitor(http: httpx.AsyncClient, number: int) -> None:
        headers = {"x-forwarded-for": f"198.51.{number // 250 % 250}.{number % 250 + 1}"}
        files = {"files": ("photo.jpg", photo, "image/jpeg")}
        path = (await http.post(f"{front}gradio_api/upload", files=files, headers=headers)).json()[0]
        session = uuid.uuid4().hex
        image = {"path": path, "meta": {"_type": "gradio.FileData"}}
        body = {"data": [image, "casual", "female"], "fn_index": fn_index, "session_hash": session}
        (await http.post(f"{front}gradio_api/queue/join", json=body, headers=headers)).raise_for_status()
        async with http.stream("GET", f"{front}gradio_api/queue/data", params={"session_hash": session}) as stream:
            async for line in stream.aiter_lines():
                if '"process_completed"' in line:
                    output = line.split("data:", 1)[1]
                    for url in _file_urls(output):
                        (await http.get(url, headers=headers)).raise_for_status()
                    break

    async with httpx.AsyncClient(timeout=60) as http:
        config = (await http.get(f"{front}config")).json()  # once: a browser fetches it once per visit, not per run
        fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "predict_api")
        warm = min(104, requests)  # the growth counts from here: the first requests fill caches and pools
        for first in range(0, requests, 8):
            await asyncio.gather(*(visitor(http, n) for n in range(first, min(requests, first + 8))))
            done = min(requests, first + 8)
            peak = max(peak, _bytes_in(kept))
            for mark in (8, warm, requests):
                if done == mark:
                    for name, process in processes.items():
                        rss[name].append(process.memory_info().rss)
    for name, samples in rss.items():
        start_mib, at_warm, end = (value / 2**20 for value in samples[-3:])
        print(
            f"{name} RSS: {start_mib:.0f} MiB after 8 requests, {at_warm:.0f} at {warm}, {end:.0f} at {requests}: "
            f"+{(samples[-1] - samples[-2]) / 1e6:.1f} MB from request {warm} to {requests}"
        )
    print(
        f"public app's kept files: peak {peak / 2**20:.1f} MiB (quota {quota_mb:g} MiB), "
        f"{_bytes_in(kept) / 2**20:.1f} MiB at the end, after {requests} requests"
    )


def memory_across_restarts(requests: int, every: int, service_time: float, photo: bytes, quota_mb: float) -> None:
    """Part 4: the soak with no restart and with a restart every `every` requests, side by side."""
    runs = [
        asyncio.run(soak_restarting(requests, every, service_time, photo, quota_mb, restart=restart))
        for restart in (False, True)
    ]
    print(
        f"memory over {requests} requests, 8 at a time, S = {service_time} s, the front's FILES_QUOTA_MB "
        f"{quota_mb:g}: RSS MiB, public app / private app"
    )
    print(f"  {'request':<26} {'no restart':<18} restart every {every} (SIGTERM, back at once)")
    for (mark, plain), (_, restarted) in zip(runs[0].rss, runs[1].rss, strict=True):
        label = f"{mark}" + (" (after a restart)" if mark in runs[1].restarted_at else "")
        print(
            f"  {label:<26} {plain[0] / 2**20:5.0f} / {plain[1] / 2**20:4.0f}      {restarted[0] / 2**20:5.0f} / "
            f"{restarted[1] / 2**20:4.0f}"
        )
    for name, run in zip(("no restart", "restarts"), runs, strict=True):
        growth = (run.rss[-1][1][0] - run.rss[0][1][0]) / 1e6
        print(
            f"  {name}: public app +{growth:.1f} MB from request {run.rss[0][0]} to {requests}; "
            f"requests with no result {run.failed}; the front counted: {run.counted}"
        )


@dataclass
class SoakRun:
    rss: list[tuple[int, tuple[int, int]]]  # (requests done, (public app's RSS, private app's RSS))
    restarted_at: set[int]  # the marks taken right after a restart's batch
    failed: str
    counted: str


async def soak_restarting(
    requests: int, every: int, service_time: float, photo: bytes, quota_mb: float, *, restart: bool
) -> SoakRun:
    """`requests` visitors, 8 at a time, through a front whose backend restarts every `every` requests if `restart`
    (memory measured at the same marks either way)."""
    token, metrics_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    backend = BackendProcess(service_time, token, BACKEND_CORES)
    backend.start()
    kept = tempfile.mkdtemp(prefix="bench-front-files-")
    env = {"METRICS_TOKEN": metrics_token, "GRADIO_TEMP_DIR": kept, "FILES_QUOTA_MB": str(quota_mb)}
    front_url, front_process = start_front(backend.url, token, env)
    rss, restarted_at, visits = [], set(), []

    def stop_and_start() -> None:
        time.sleep(0.1)  # the batch's jobs are in flight
        backend.stop(signal.SIGTERM)
        backend.start()

    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=300)) as http:
            front = Front(front_url, http, ("photo.jpg", photo, "image/jpeg"))
            first_mark = -(-min(100, requests) // 8) * 8  # request 100's batch ends at 104
            marks = {first_mark, requests} | {m + 8 for m in range(every, requests, every)}
            for first in range(0, requests, 8):
                batch = [Visit(n) for n in range(first, min(requests, first + 8))]
                restarting = restart and first and first % every == 0
                work = [front.visit(record) for record in batch]
                if restarting:
                    work.append(asyncio.to_thread(stop_and_start))
                await asyncio.gather(*work)
                visits += batch
                done = first + len(batch)
                if done in marks:
                    sizes = (psutil.Process(front_process.pid).memory_info().rss, backend.rss())
                    rss.append((done, sizes))
                if restarting:
                    restarted_at.add(done)
            figures = metrics(front_url, metrics_token)
    finally:
        front_process.kill()
        backend.kill()
    resent = [round(figure(figures, "backdrop_jobs_resent_total", after=what)) for what in ("waiting", "running")]
    lost = round(figure(figures, "backdrop_jobs_total", outcome="lost", reason=""))
    return SoakRun(
        rss, restarted_at, errors(visits), f"jobs sent again {resent[0]} waiting, {resent[1]} running; lost {lost}"
    )


def _bytes_in(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _file_urls(message: str) -> list[str]:
    import json

    data = json.loads(message)["output"]["data"]
    return [item["url"] for item in data[:2] if isinstance(item, dict) and item.get("url")]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py traffic", description=__doc__)
    parser.add_argument("--service-time", type=float, default=0.15, help="the stand-in's GPU seconds per job (S)")
    parser.add_argument("--callers", type=int, default=24, help="simultaneous callers (N)")
    parser.add_argument("--requests", type=int, default=1000, help="requests through both apps for memory")
    parser.add_argument("--quota-mb", type=float, default=64, help="the front's FILES_QUOTA_MB in the soak")
    parser.add_argument("--soak-only", action="store_true", help="only part 3 (memory and files on disk)")
    parser.add_argument("--restart-every", type=int, default=0, metavar="K", help="only part 4, restarting every K")
    args = parser.parse_args(argv)
    token = secrets.token_urlsafe(16)
    photo = photo_1024x768()
    print(f"photo: 1024×768 JPEG, {len(photo) / 1000:.0f} kB; backend on core {sorted(BACKEND_CORES)}")
    if args.restart_every:
        memory_across_restarts(args.requests, args.restart_every, args.service_time, photo, args.quota_mb)
        return
    if not args.soak_only:
        cpu_stages(photo)
        back, front, processes = start_stack(args.service_time, token)
        try:
            asyncio.run(gpu_use(back, token, args.callers, args.service_time, photo))
        finally:
            for process in processes:
                process.kill()
        small_waits(token, photo)
    kept = Path(tempfile.mkdtemp(prefix="bench-front-files-"))
    back, front, processes = start_stack(
        0.0, token, {"GRADIO_TEMP_DIR": str(kept), "FILES_QUOTA_MB": str(args.quota_mb)}
    )
    try:
        named = {"private app": psutil.Process(processes[0].pid), "public app": psutil.Process(processes[1].pid)}
        asyncio.run(soak(front, args.requests, photo, named, kept=kept, quota_mb=args.quota_mb))
    finally:
        for process in processes:
            process.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
