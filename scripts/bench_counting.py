"""What counting costs: the relay's added latency with the public app counting and without, side by side.

    python scripts/bench.py counting [--calls 40]

One backend (bench.py's: the private app around the stand-in pipeline at S = 0, on a core of its own) and two
public apps in front of it, the same code, one with METRICS_TOKEN set (it counts every job and serves /metrics) and
one without (no route, so nothing is counted: front_metrics.NoMetrics). Each round calls the backend directly, then
each front, one call at a time (which front goes first alternates); a front's added latency is its call minus the
round's direct call, as in bench.py's main mode. Prints p50/p95 added latency for both and their difference, the
median of the rounds' own differences (counting minus not), and, timed in-process where nothing else moves, the
microseconds counting adds to one job and the milliseconds of one /metrics scrape.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable

import httpx
from bench import API, FRONT_CORES, PHOTO, ROOT, SSL, percentile, start_backend, start_front

WARM_UP_ROUNDS = 3


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="bench.py counting", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=40, help="calls through each front (and as many direct)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.sched_setaffinity(0, FRONT_CORES)  # the callers, beside the fronts
    from gradio_client import Client, handle_file

    token, metrics_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    back, backend = start_backend(0.0, token)
    processes = [backend]
    try:
        counting, process = start_front(back, token, {"METRICS_TOKEN": metrics_token})
        processes.append(process)
        plain, process = start_front(back, token)
        processes.append(process)
        direct = Client(back, token=token, verbose=False, download_files=False, ssl_verify=SSL)
        photo_b64 = base64.b64encode(PHOTO.read_bytes()).decode()
        fronts = {
            name: Client(url, token=False, verbose=False, ssl_verify=SSL)
            for name, url in (("counting", counting), ("not counting", plain))
        }

        def timed(call: Callable[[], object]) -> float:
            started = time.perf_counter()
            call()
            return time.perf_counter() - started

        added: dict[str, list[float]] = {name: [] for name in fronts}
        for round_ in range(WARM_UP_ROUNDS + args.calls):
            base = timed(lambda: direct.predict(photo_b64, "casual", "male", api_name=API))
            order = list(fronts) if round_ % 2 == 0 else list(reversed(fronts))
            for name in order:
                took = timed(lambda c=fronts[name]: c.predict(handle_file(str(PHOTO)), "casual", "male", api_name=API))
                if round_ >= WARM_UP_ROUNDS:
                    added[name].append(took - base)
        counted = jobs_done(counting, metrics_token)
        plain_route = httpx.get(f"{plain}metrics", headers={"authorization": f"Bearer {metrics_token}"}).status_code
    finally:
        for process in processes:
            process.kill()
    print(f"relay added latency over {args.calls} calls each (front minus direct, same round):")
    figures = {name: [1000 * percentile(values, q) for q in (0.5, 0.95)] for name, values in added.items()}
    for name, label in (("counting", "METRICS_TOKEN set"), ("not counting", "METRICS_TOKEN unset")):
        p50, p95 = figures[name]
        print(f"  front {name:<12} ({label:<19}): p50 {p50:5.1f} ms · p95 {p95:5.1f} ms")
    (c50, c95), (n50, n95) = figures["counting"], figures["not counting"]
    print(f"  difference (counting - not):            p50 {c50 - n50:+5.1f} ms · p95 {c95 - n95:+5.1f} ms")
    paired = [c - n for c, n in zip(added["counting"], added["not counting"], strict=True)]
    print(f"  median of each round's own difference: {1000 * statistics.median(paired):+.2f} ms")
    print(f"  (the counting front counted {counted:.0f} jobs done; the other's /metrics answered {plain_route})")
    per_job_us, render_ms = counting_cost()
    print(f"in-process: counting {per_job_us:.1f} µs per job; one /metrics scrape {render_ms:.2f} ms (one backend)")


def jobs_done(front: str, metrics_token: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{front}metrics", headers={"authorization": f"Bearer {metrics_token}"}).text
    return next(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "backdrop_jobs_total" and sample.labels == {"outcome": "done", "reason": ""}
    )


def counting_cost(jobs: int = 20000) -> tuple[float, float]:
    """(µs the public app's counting adds to one job, ms of one /metrics render with one backend), in this process."""
    sys.path.insert(0, str(ROOT / "public_space"))
    from front_metrics import FrontMetrics
    from pool import Backends

    metrics = FrontMetrics(Backends.connect(["http://127.0.0.1:9/"], None))
    started = time.perf_counter()
    for _ in range(jobs):
        with metrics.job() as job:
            job.run()
            job.done()
    per_job = (time.perf_counter() - started) / jobs
    started = time.perf_counter()
    for _ in range(200):
        metrics.render()
    return 1e6 * per_job, 1000 * (time.perf_counter() - started) / 200


if __name__ == "__main__":
    main(sys.argv[1:])
