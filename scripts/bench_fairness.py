"""Fair share and hardened edges of the public app, measured on both apps as processes on loopback.

    python scripts/bench.py fairness [--service-time 0.5] [--flood 40] [--queue-max-size 32] [--soak 300]
                                     [--root DIR]

The backend is the real private app around the stand-in pipeline (service time S, queue of --queue-max-size);
the front is `public_space/app.py` itself with its default settings but no result cache (each visitor sends the
example photo). Visitors are told apart by the X-Forwarded-For entry a proxy would append (TRUSTED_PROXY_HOPS=1),
and each request of the flooder also writes a different forged entry in front of it. Prints:
- visitor A sends --flood requests at once; B sends one 0.5 s later; C sends one once A's have settled: how
  many of each were refused and why, C's first place in line, and C's time to finish in job times (S);
- the front's peak memory while it takes one 12000×8000 JPEG (96 megapixels), then one of 7680×5120 (39);
- the lines the front logs for 100 requests for an unknown session's stream, and how many are tracebacks;
- a soak of --soak requests (S = 0, 4 callers, fair share off): files in the front's Gradio folder at the
  peak and once the last result has been fetched.
--root runs the apps of another checkout (the same commands before a change, for "before" figures).
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from bench import FRONT_CORES, PHOTO, ROOT, SSL, Sampler, blocks_of, free_port, start

API = "/predict_api"
BIG_JPEGS = ((12000, 8000), (7680, 5120))  # 96 megapixels: over the limit; 39: under it, decoded to downscale


def serve_backend(root: Path, port: int, service_time: float, queue_max_size: int) -> None:
    """Child process: the private app of `root` around the stand-in pipeline (token from BACKEND_TOKEN)."""
    sys.path[:0] = [str(root / "private_space"), str(ROOT / "scripts")]
    from standin import StandInPipeline

    import app

    demo = app.create_app(StandInPipeline(service_time=service_time), queue_max_size=queue_max_size)
    app.serve(demo, server_name="127.0.0.1", server_port=port, quiet=True)
    blocks_of(demo).block_thread()


def start_apps(root: Path, service_time: float, queue_max_size: int, front_env: dict[str, str]) -> tuple:
    """Both apps; returns the front's URL, its Gradio folder, its log file, and the processes."""
    token, back_port, front_port = secrets.token_urlsafe(16), free_port(), free_port()
    back, front = f"http://127.0.0.1:{back_port}/", f"http://127.0.0.1:{front_port}/"
    quiet = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, __file__, "--serve-backend", str(back_port), "--root", str(root)]
    command += ["--service-time", str(service_time), "--queue-max-size", str(queue_max_size)]
    backend = start(
        command,
        {**quiet, "BACKEND_TOKEN": token},
        f"{back}config",
        FRONT_CORES,
        {"x-hf-authorization": f"Bearer {token}"},
    )
    time.sleep(1 + service_time)  # the warm-up request
    folder = Path(tempfile.mkdtemp(prefix="bench-front-"))
    log = folder.with_suffix(".log")
    env = {
        **os.environ,
        **quiet,
        "TRUSTED_PROXY_HOPS": "1",  # visitors are told apart by the entry a proxy appends (an old app's default)
        **front_env,
        "BACKEND": back,
        "HF_TOKEN": token,
        "GRADIO_SERVER_PORT": str(front_port),
    }
    env["GRADIO_TEMP_DIR"] = str(folder)
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, str(root / "public_space" / "app.py")], env=env, stdout=out, stderr=out
        )
    deadline = time.monotonic() + 120
    while not _up(front) and time.monotonic() < deadline:
        time.sleep(0.2)
    return front, folder, log, [backend, process]


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def client(front: str, address: str, forged: str | None = None):  # noqa: ANN201
    from gradio_client import Client

    forwarded = f"{forged}, {address}" if forged else address
    return Client(front, token=False, verbose=False, ssl_verify=SSL, headers={"X-Forwarded-For": forwarded})


def submit(visitor, photo: Path = PHOTO):  # noqa: ANN001, ANN201
    from gradio_client import handle_file

    return visitor.submit(handle_file(str(photo)), "casual", "male", api_name=API)


def outcome(job) -> str:  # noqa: ANN001
    try:
        return job.result(timeout=600)[2]
    except Exception as error:  # a refusal is an outcome here
        return f"refused: {error}"


def flood(front: str, n: int, service_time: float) -> None:
    flooders = [client(front, "203.0.113.1", forged=f"192.0.2.{i % 250}") for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        a_jobs = list(pool.map(submit, flooders))
    time.sleep(0.5)
    b_job = submit(client(front, "203.0.113.2"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
        job.done() or job.status().code.name != "STARTING" for job in a_jobs
    ):
        time.sleep(0.1)
    time.sleep(1.0)  # A's requests have settled: in line, or refused
    c_started = time.monotonic()
    c_job = submit(client(front, "203.0.113.3"))
    c_result = outcome(c_job)
    c_took = time.monotonic() - c_started
    places = [o[2] for o in c_job.outputs() if " in line" in str(o[2])]
    results = {"A": [outcome(job) for job in a_jobs], "B": [outcome(b_job)], "C": [c_result]}
    for who, texts in results.items():
        refused = [t for t in texts if t.startswith("refused")]
        reasons = sorted({t.removeprefix("refused: ") for t in refused})
        print(f"visitor {who}: {len(texts) - len(refused)} of {len(texts)} accepted; refused {len(refused)} {reasons}")
    first = places[0] if places else "(none)"
    print(f"visitor C: first place shown {first!r}; done in {c_took:.1f} s = {c_took / service_time:.1f} job times")


def big_jpeg(front: str, pid: int, width: int, height: int) -> None:
    path = Path(tempfile.gettempdir()) / f"backdrop-bench-{width}x{height}.jpg"
    if not path.exists():
        from PIL import Image

        Image.linear_gradient("L").resize((width, height)).convert("RGB").save(path, quality=85)
    rss = Sampler(psutil.Process(pid))
    with rss:
        text = outcome(submit(client(front, f"203.0.113.{width % 250}"), path))
    start_mib, peak_mib = rss.samples[0] / 2**20, max(rss.samples) / 2**20
    print(f"front RSS, one {width}x{height} JPEG ({path.stat().st_size / 2**20:.1f} MB): ", end="")
    print(f"start {start_mib:.0f} MiB, peak {peak_mib:.0f} MiB (+{peak_mib - start_mib:.0f}); answer {text[:50]!r}")


def bad_requests(front: str, log: Path) -> None:
    before = len(log.read_text().splitlines())
    with httpx.Client(base_url=front, timeout=5) as http:
        for _ in range(100):
            try:
                with http.stream("GET", "gradio_api/queue/data", params={"session_hash": "unknown"}) as stream:
                    for _line in stream.iter_lines():
                        pass
            except httpx.HTTPError:
                pass
    time.sleep(0.5)
    lines = log.read_text().splitlines()[before:]
    tracebacks = sum("Traceback" in line for line in lines)
    print(f"front log for 100 requests for an unknown session's stream: {len(lines)} lines, {tracebacks} tracebacks")


def soak(root: Path, n: int) -> None:
    front, folder, _, processes = start_apps(
        root, 0.0, 256, {"MAX_JOBS_PER_VISITOR": "0", "VISITOR_RATE": "", "RESULT_CACHE_ENTRIES": "0"}
    )
    counts: list[int] = []
    stop = threading.Event()

    def count() -> None:
        while not stop.wait(0.2):
            counts.append(sum(1 for p in folder.rglob("*") if p.is_file()))

    try:
        callers = [client(front, f"198.51.100.{i}") for i in range(4)]
        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda i: outcome(submit(callers[i % 4])), range(n)))
        took = time.monotonic() - started
        time.sleep(6)  # a fetched result stays a few seconds (gradio_client fetches it twice)
        stop.set()
        left = sum(1 for p in folder.rglob("*") if p.is_file())
    finally:
        for process in processes:
            process.kill()
    done = sum(t.startswith("Done") for t in texts)
    print(f"soak: {done}/{n} done in {took:.0f} s by 4 callers; ", end="")
    print(f"files in the front's Gradio folder: peak {max(counts)}, after the last fetch {left}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service-time", type=float, default=0.5, help="the stand-in's seconds per job (S)")
    parser.add_argument("--flood", type=int, default=40, help="requests visitor A sends at once")
    parser.add_argument("--queue-max-size", type=int, default=32, help="the backend's QUEUE_MAX_SIZE")
    parser.add_argument("--soak", type=int, default=300, help="requests in the disk soak (0: skip it)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose apps to run")
    parser.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if args.serve_backend:
        serve_backend(root, args.serve_backend, args.service_time, args.queue_max_size)
        return
    print(f"apps from {root}; S = {args.service_time} s; backend QUEUE_MAX_SIZE = {args.queue_max_size}")
    # No result cache: every visitor sends the example photo, whose kept result is everyone's (C would not wait).
    front, _, log, processes = start_apps(root, args.service_time, args.queue_max_size, {"RESULT_CACHE_ENTRIES": "0"})
    try:
        flood(front, args.flood, args.service_time)
        for width, height in BIG_JPEGS:
            big_jpeg(front, processes[1].pid, width, height)
        bad_requests(front, log)
    finally:
        for process in processes:
            process.kill()
    if args.soak:
        soak(root, args.soak)


if __name__ == "__main__":
    main(sys.argv[1:])
