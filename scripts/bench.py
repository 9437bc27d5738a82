"""Benchmark the relay: the backend with a stand-in pipeline of fixed service time, the public app in front.

    python scripts/bench.py [--service-time 0.5] [--callers 24] [--latency-calls 30] [--models .tiny-models]
                            [--jpeg] [--root DIR]

Both apps run as their own processes on loopback. The backend is the real private app built by `create_app()`
around `standin.StandInPipeline` (a sleep instead of the GPU); the front is `public_space/app.py` itself. On a
machine with two or more cores the backend gets a core of its own (as it would be a machine of its own), and the
front shares the other with the callers. Every gradio_client gets one shared SSL context: without it, each
request and each file download builds a new one (~40 ms of CPU), which would swamp what is measured here. Each
caller is a visitor of its own address (the X-Forwarded-For entry a proxy appends; the front believes one hop,
TRUSTED_PROXY_HOPS=1, as on Hugging Face). The photo is the 512-px example, or with --jpeg a 1024×768 JPEG (a
phone photo after the front's downscale). --root runs another checkout's apps (and its stand-in) under this same
harness, for figures side by side with an earlier commit.
Prints, all measured in this one run:
- relay added latency, p50 and p95: one caller at a time, through the front minus directly to the backend;
- makespan / (N·S) for N concurrent callers through the front (and directly, for comparison);
- the share of queued callers that saw their place in line;
- the median absolute error of the first ETA each queued caller was shown, against its actual finish;
- the front's resident memory (peak while loaded);
- with --models DIR: the private app's own entry point on real model code (tiny weights, built into DIR if
  missing): its warm-up time, one call's time and the process's peak memory.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import os
import re
import secrets
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "public_space" / "examples" / "astronaut.png"
API = "/predict_api"
CORES = sorted(os.sched_getaffinity(0))
BACKEND_CORES = {CORES[0]} if len(CORES) > 1 else set(CORES)
FRONT_CORES = set(CORES[1:]) or set(CORES)  # the front and the callers
SSL = ssl.create_default_context()
QUIET = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}


@dataclass
class Caller:
    submitted: float = 0.0
    finished: float = 0.0
    statuses: list[tuple[float, str]] = field(default_factory=list)


class PhotoBytes:
    """A photo as the relay's pool reads it for each sending (backends.Photo), here from memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def bytes(self) -> bytes:
        return self.data


def photo_1024x768() -> bytes:
    """The example portrait as a phone photo arrives after the front's downscale: 1024×768 JPEG."""
    buffer = io.BytesIO()
    ImageOps.fit(Image.open(PHOTO).convert("RGB"), (1024, 768)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def address(n: int) -> str:
    """Visitor n's address (one of 2**24, from 10.0.0.1), sent as the X-Forwarded-For entry a proxy appends."""
    n += 1
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_backend(port: int, service_time: float, root: Path = ROOT) -> None:
    """Child process: the real private app of `root` around its stand-in pipeline (token from BACKEND_TOKEN)."""
    sys.path[:0] = [str(root / "private_space"), str(root / "scripts")]
    from standin import StandInPipeline

    import app

    demo = app.create_app(StandInPipeline(service_time=service_time), queue_max_size=256)
    app.serve(demo, server_name="127.0.0.1", server_port=port, quiet=True)
    blocks_of(demo).block_thread()


def blocks_of(app: object) -> object:
    """An app's gr.Blocks: what `create_app` returns, or its `.blocks` (since it returns an object of its own; a
    Blocks has a `.blocks` too, a dict of its components)."""
    import gradio as gr

    return app if isinstance(app, gr.Blocks) else app.blocks


def start(
    command: list[str], env: dict[str, str], url: str, cores: set[int], headers: dict | None = None
) -> subprocess.Popen:
    process = subprocess.Popen(
        command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.sched_setaffinity(process.pid, cores)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{command} did not start")


def backend_command(port: int, service_time: float, root: Path = ROOT) -> list[str]:
    """The command that serves `root`'s private app around the stand-in on `port` (`serve_backend`)."""
    command = [sys.executable, __file__, "--serve-backend", str(port), "--service-time", str(service_time)]
    return [*command, "--root", str(root)]


def start_backend(service_time: float, token: str, root: Path = ROOT) -> tuple[str, subprocess.Popen]:
    """The private app around the stand-in, on a core of its own, warmed up; its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start(
        backend_command(port, service_time, root),
        {**QUIET, "BACKEND_TOKEN": token},
        f"{url}config",
        BACKEND_CORES,
        {"Authorization": f"Bearer {token}"},
    )
    time.sleep(1 + service_time)  # the warm-up request
    return url, process


def start_front(
    back: str, token: str, front_env: dict[str, str] | None = None, root: Path = ROOT
) -> tuple[str, subprocess.Popen]:
    """`root`'s `public_space/app.py` in front of `back`, sharing the callers' cores; its URL and process."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**QUIET, "BACKEND": back, "HF_TOKEN": token, "GRADIO_SERVER_PORT": str(port)}
    # Visitors are told apart by the X-Forwarded-For entry a proxy appends (`address`), as on Hugging Face; callers
    # that send none are one visitor, 127.0.0.1. Many send the same photo: no fair share, no result cache. (Some
    # send photos of their own from one address: no bound on one visitor's number of uploads either.)
    env |= {"TRUSTED_PROXY_HOPS": "1", "MAX_JOBS_PER_VISITOR": "0", "VISITOR_RATE": ""}
    env |= {"RESULT_CACHE_ENTRIES": "0", "VISITOR_FILES": "0"}
    command = [sys.executable, str(root / "public_space" / "app.py")]
    return url, start(command, env | (front_env or {}), url, FRONT_CORES)


def start_stack(
    service_time: float, token: str, front_env: dict[str, str] | None = None, root: Path = ROOT
) -> tuple[str, str, list[subprocess.Popen]]:
    back, backend = start_backend(service_time, token, root)
    front, front_process = start_front(back, token, front_env, root)
    return back, front, [backend, front_process]


def photo_file(jpeg: bool) -> Path:
    """The photo the callers send, as a file: the 512-px example, or (`jpeg`) a 1024×768 JPEG made from it."""
    if not jpeg:
        return PHOTO
    path = Path(tempfile.gettempdir()) / "backdrop-bench-1024x768.jpg"
    if not path.exists():  # the same bytes every time
        path.write_bytes(photo_1024x768())
    return path


def commit_of(root: Path) -> str:
    """The checkout's commit, short (and "+" when its tracked files differ from it)."""
    git = ["git", "-C", str(root)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], check=False, capture_output=True, text=True)
    return (head.stdout.strip() or "?") + ("+" if dirty.stdout.strip() else "")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(calls: int, token: str, photo: Path = PHOTO, root: Path = ROOT) -> None:
    from gradio_client import Client, handle_file

    back, front, processes = start_stack(0.0, token, root=root)
    try:
        direct = Client(back, token=token, verbose=False, download_files=False, ssl_verify=SSL)
        relayed = Client(front, token=False, verbose=False, ssl_verify=SSL, headers={"X-Forwarded-For": address(0)})
        other = {"X-Forwarded-For": address(1)}
        unfetched = Client(front, token=False, verbose=False, ssl_verify=SSL, download_files=False, headers=other)
        photo_b64 = base64.b64encode(photo.read_bytes()).decode()
        times: dict[str, list[float]] = {"direct": [], "front": [], "unfetched": []}
        for i in range(calls + 3):  # the first three of each warm both paths up
            for name, call in (
                ("direct", lambda: direct.predict(photo_b64, "casual", "male", api_name=API)),
                ("front", lambda: relayed.predict(handle_file(str(photo)), "casual", "male", api_name=API)),
                ("unfetched", lambda: unfetched.predict(handle_file(str(photo)), "casual", "male", api_name=API)),
            ):
                started = time.perf_counter()
                call()
                if i >= 3:
                    times[name].append(time.perf_counter() - started)
        added = [f - d for f, d in zip(times["front"], times["direct"], strict=True)]  # each pair ran back to back
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            d, f = percentile(times["direct"], q), percentile(times["front"], q)
            added_ms = 1000 * percentile(added, q)
            print(f"relay added latency {label}: {added_ms:5.1f} ms  (front {1000 * f:.0f}, direct {1000 * d:.0f} ms)")
        unfetched_ms = 1000 * percentile(
            [u - d for u, d in zip(times["unfetched"], times["direct"], strict=True)], 0.5
        )
        print(f"  of which the relay, without downloading the two result files: {unfetched_ms:.1f} ms p50")
    finally:
        for process in processes:
            process.kill()


def run_callers(clients: list, call: Callable[[object], Caller]) -> tuple[list[Caller], float]:
    """Start every caller at once; return their records and the makespan."""
    started = time.monotonic()
    with ThreadPoolExecutor(len(clients)) as pool:
        records = list(pool.map(call, clients))
    return records, max(r.finished for r in records) - started


def load(callers: int, service_time: float, token: str, photo: Path = PHOTO, root: Path = ROOT) -> None:
    from gradio_client import Client, handle_file

    photo_b64 = base64.b64encode(photo.read_bytes()).decode()

    def through_front(client: Client) -> Caller:
        record = Caller(submitted=time.monotonic())
        job = client.submit(handle_file(str(photo)), "casual", "male", api_name=API)
        for output in job:  # each intermediate status, as it arrives
            record.statuses.append((time.monotonic(), output[2]))
        job.result()
        record.finished = time.monotonic()
        return record

    def direct(client: Client) -> Caller:
        record = Caller(submitted=time.monotonic())
        client.predict(photo_b64, "casual", "male", api_name=API)
        record.finished = time.monotonic()
        return record

    back, front, processes = start_stack(service_time, token, root=root)
    rss = Sampler(psutil.Process(processes[1].pid))
    try:
        clients = [
            Client(front, token=False, verbose=False, ssl_verify=SSL, headers={"X-Forwarded-For": address(n)})
            for n in range(callers)
        ]
        for client in clients[:3]:  # "once warm": the backend's mean job time now comes from real requests
            through_front(client)
        with rss:
            records, makespan = run_callers(clients, through_front)
        clients = [
            Client(back, token=token, verbose=False, download_files=False, ssl_verify=SSL) for _ in range(callers)
        ]
        direct_records, direct_makespan = run_callers(clients, direct)
    finally:
        for process in processes:
            process.kill()

    ideal = callers * service_time
    print(f"makespan / (N·S) through the front: {makespan / ideal:.3f}  ({makespan:.2f} s; ideal {ideal:.2f} s)")
    print(f"makespan / (N·S) direct to backend: {direct_makespan / ideal:.3f}  ({direct_makespan:.2f} s)")
    for name, runs in (("through the front", records), ("direct", direct_records)):
        finishes = sorted(r.finished for r in runs)
        gap = statistics.median(b - a for a, b in itertools.pairwise(finishes))
        print(f"  {name}: one job every {1000 * gap:.0f} ms (S = {1000 * service_time:.0f} ms)")
    queued = sorted(records, key=lambda r: r.finished)[1:]  # everyone but the first to run had to wait
    saw_place = [r for r in queued if any(" in line" in text for _, text in r.statuses)]
    print(f"queued callers who saw their place: {len(saw_place)}/{len(queued)}")
    errors = [eta_error(r) for r in queued if any("about" in text for _, text in r.statuses)]
    median = 100 * statistics.median(errors)
    print(f"median |first ETA shown - actual finish| / actual wait: {median:.1f} %  (n={len(errors)})")
    print(f"front RSS: start {rss.samples[0] / 2**20:.0f} MiB, peak under load {max(rss.samples) / 2**20:.0f} MiB")


def eta_error(record: Caller) -> float:
    """|when the first ETA said the job would finish - when it did| / how long it actually took from then."""
    shown_at, eta = next((t, shown_wait(text)) for t, text in record.statuses if shown_wait(text) is not None)
    return abs(shown_at + eta - record.finished) / (record.finished - shown_at)


def shown_wait(text: str) -> float | None:
    """The seconds a status line's "about 4.2 s", "about 1 min 30 s" or "about 12 min" says, or None."""
    match = re.search(r"about (\d+(?:\.\d)?) (s|min)(?: (\d+) s)?", text)
    if match is None:
        return None
    return float(match[1]) * (60 if match[2] == "min" else 1) + float(match[3] or 0)


class Sampler:
    """The resident memory of a process, sampled every 100 ms while in use."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.samples = [process.memory_info().rss]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self.process.memory_info().rss)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def backend_on_models(models: Path, token: str) -> None:
    """The private app's own entry point on real model code (tiny weights): warm-up and one call, time and memory."""
    from gradio_client import Client

    if not (models / "segmentation").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "--out", str(models)], check=True
        )
    port = free_port()
    env = {
        **os.environ,
        "SEGMENTATION_MODEL": str(models / "segmentation"),
        "BACKGROUND_MODEL": str(models / "background"),
        "BACKEND_TOKEN": token,
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, str(ROOT / "private_space" / "app.py")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rss = Sampler(psutil.Process(process.pid))
        with rss:
            for line in process.stdout:
                if "Warm-up done in" in line:
                    warm_up = line.rsplit("Warm-up done in", 1)[1].strip().rstrip(".")
                    break
            loaded = max(rss.samples)
        client = Client(f"http://127.0.0.1:{port}/", token=token, verbose=False, download_files=False, ssl_verify=SSL)
        photo_b64 = base64.b64encode(PHOTO.read_bytes()).decode()
        with Sampler(psutil.Process(process.pid)) as during:
            started = time.perf_counter()
            status = client.predict(photo_b64, "casual", "female", api_name=API)[3]
            took = time.perf_counter() - started
    finally:
        process.kill()
    print(f"tiny models: warm-up {warm_up} (server-side); peak RSS through start and warm-up {loaded / 2**20:.0f} MiB")
    print(f"tiny models: one predict_api call {1000 * took:.0f} ms at the caller ({status}, 512x512 photo)")
    peak, before = max(during.samples) / 2**20, during.samples[0] / 2**20
    print(f"tiny models: peak RSS during the call {peak:.0f} MiB (+{peak - before:.0f})")


# Further modes, each in a module of its own beside this one: `python scripts/bench.py MODE --help`.
MODES: dict[str, str] = {
    "models": "bench_models",  # full-size models on CPU, stage by stage
    "traffic": "bench_traffic",  # the private app under production traffic: GPU use, ETAs, memory of both apps
    "fairness": "bench_fairness",  # fair share between visitors, big uploads, bad requests, files on disk
    "backends": "bench_backends",  # several backends: routing, throughput, one killed mid-run
    "callers": "bench_callers",  # many gradio_client callers at once: each gets its own files
    "example-cache": "bench_cache",  # the result cache: the example photo again while the GPU queue is full
    "etas": "bench_etas",  # the first wait each visitor is told against their result: stand-in and full size
    "front": "bench_front",  # the public front's CPU per request beside a plain Gradio app, and its maximum rate
    "counting": "bench_counting",  # the relay's added latency with the front counting (METRICS_TOKEN) and without
    "files": "bench_files",  # a flood of tiny uploads: files on disk against what is counted; bookkeeping per upload
    "line": "bench_line",  # MAX_WAIT_S under a flood: admitted and refused, the longest wait against the cap
    "restart": "bench_restart",  # a backend stopped and started again under a full line; two restarted in turn
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in MODES:
        sys.path.insert(0, str(ROOT / "scripts"))
        module = __import__(MODES[sys.argv[1]])
        module.main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service-time", type=float, default=0.5, help="the stand-in's seconds per job (S)")
    parser.add_argument("--callers", type=int, default=24, help="concurrent callers in the load run (N)")
    parser.add_argument("--latency-calls", type=int, default=30, help="sequential calls per path for latency")
    parser.add_argument("--models", type=Path, help="also time the private app on these (or new tiny) model folders")
    parser.add_argument("--jpeg", action="store_true", help="send a 1024×768 JPEG instead of the 512-px example")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose apps run (default: this one)")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.root.resolve()
    if args.serve_backend:
        serve_backend(args.serve_backend, args.service_time, root)
        return
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    token = secrets.token_urlsafe(16)
    os.sched_setaffinity(0, FRONT_CORES)  # the callers
    photo = photo_file(args.jpeg)
    print(
        f"apps of {root} (git {commit_of(root)}); photo {photo.name}; "
        f"cores: backend {sorted(BACKEND_CORES)}, front and callers {sorted(FRONT_CORES)}"
    )
    if args.models:
        backend_on_models(args.models, token)
    latency(args.latency_calls, token, photo, root)
    load(args.callers, args.service_time, token, photo, root)


if __name__ == "__main__":
    main()
