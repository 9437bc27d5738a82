"""Benchmark the line's promise (issue 22.4): with MAX_WAIT_S, is any admitted photo kept longer, and how fast is a
refusal?

    python scripts/bench.py line [--cap 10] [--service-time 0.5] [--burst 40] [--rate 6] [--seconds 15] [--cold]

The backend is the real private app around the stand-in (S seconds of "GPU" a job), on a core of its own; the
front is `public_space/app.py` with MAX_WAIT_S = --cap and its production fair share (METRICS_TOKEN set, no result
cache); every visitor runs a 1024×768 JPEG from an address of its own, as a browser does (bench_visits.py). After
three warm runs (the front's figures come from real jobs; none with --cold, as right after the front starts), a
flood: --burst visitors at once, then --rate a second
for --seconds, far more than the cap holds (it holds about cap / S jobs). Prints:
- how many were admitted and how many refused (by the line, and anything else, with its sentence);
- of the admitted jobs, the longest wait from admission (the queue's join) to the start (the first status line
  in which the GPU works on it) and to the result, against the cap (goal: none over the cap + 10 %), and the p95;
- the refusal's latency at the caller, from the queue's join to the refusal (p50, p95, max; goal: under 100 ms),
  for all refusals, those in the burst and those in the stream;
- the jobs the front sent to its backend (`backdrop_backend_jobs_sent_total`) and the jobs the backend itself
  counted (its /metrics, BACKEND_TOKEN) during the flood, against the admitted ones: a refused photo sends nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import sys
import time
from collections import Counter

import httpx
from bench import BACKEND_CORES, FRONT_CORES, photo_1024x768, start_front
from bench_restart import BackendProcess
from bench_visits import Front, Visit, figure, metrics, percentile, sum_of

TOO_LONG = "The line is too long right now"  # how the line's refusal begins (waiting.LineTooLong)


async def flood(front: Front, burst: int, rate: float, seconds: float) -> list[Visit]:
    """`burst` visitors at once, then `rate` a second for `seconds`; every record once all runs are over."""
    numbers, records, runs = itertools.count(100), [], []

    def arrive() -> None:
        records.append(Visit(next(numbers)))
        runs.append(asyncio.get_running_loop().create_task(front.visit(records[-1])))

    for _ in range(burst):
        arrive()
    began = time.monotonic()
    for n in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
        arrive()
    await asyncio.gather(*runs)
    return records


def seconds(values: list[float]) -> str:
    low, p50, p95, high = min(values), percentile(values, 0.5), percentile(values, 0.95), max(values)
    return f"min {low:.2f} s, p50 {p50:.2f} s, p95 {p95:.2f} s, max {high:.2f} s"


async def measure(args: argparse.Namespace) -> None:
    token, metrics_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    backend = BackendProcess(args.service_time, token, BACKEND_CORES)
    startup = backend.start()
    env = {"MAX_WAIT_S": str(args.cap), "METRICS_TOKEN": metrics_token}
    env |= {"MAX_JOBS_PER_VISITOR": "2", "VISITOR_RATE": "6/minute", "VISITOR_FILES": "50"}  # production's
    front_url, process = start_front(backend.url, token, env)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=300), limits=limits) as http:
            front = Front(front_url, http, ("photo.jpg", photo_1024x768(), "image/jpeg"))
            for number in range(0 if args.cold else 3):  # warm: the front's figures come from real jobs
                await front.visit(Visit(number))
            await asyncio.sleep(1)
            front_before, back_before = metrics(front_url, metrics_token), metrics(backend.url, token)
            records = await flood(front, args.burst, args.rate, args.seconds)
            front_after, back_after = metrics(front_url, metrics_token), metrics(backend.url, token)
    finally:
        process.kill()
        backend.kill()

    refused = [r for r in records if r.error and r.error.startswith(TOO_LONG)]
    admitted = [r for r in records if r not in refused]
    other = Counter(r.error for r in admitted if r.error)
    print(
        f"S = {args.service_time} s (backend start-up {startup:.1f} s), MAX_WAIT_S = {args.cap:g} s (about "
        f"{args.cap / args.service_time:.0f} jobs); {len(records)} visitors: {args.burst} at once, then "
        f"{args.rate:g}/s for {args.seconds:g} s"
    )
    print(
        f"  admitted {len(admitted)}, refused by the line {len(refused)}; other errors {sum(other.values())}"
        + (f" {dict(other)}" if other else "")
    )
    if refused:
        print(f"  the refusal: {refused[0].error!r}")
    done = [r for r in admitted if r.done]
    to_start = [r.started - r.joined for r in done if r.started and r.joined]
    to_result = [r.ended - r.joined for r in done if r.joined]
    bound = 1.1 * args.cap
    if done:
        over = sum(wait > bound for wait in to_result)
        print(f"  admitted, admission to start:  {seconds(to_start)}")
        print(
            f"  admitted, admission to result: {seconds(to_result)}; over the cap + 10 % ({bound:.1f} s): {over} "
            f"of {len(to_result)}"
        )
    in_burst = set(map(id, records[: args.burst]))
    for name, group in (
        ("all", refused),
        ("in the burst", [r for r in refused if id(r) in in_burst]),
        ("in the stream", [r for r in refused if id(r) not in in_burst]),
    ):
        if latency := [1000 * (r.ended - r.joined) for r in group if r.joined]:
            print(
                f"  refusal latency at the caller, {name} ({len(latency)}): p50 {percentile(latency, 0.5):.0f} ms, "
                f"p95 {percentile(latency, 0.95):.0f} ms, max {max(latency):.0f} ms (goal < 100 ms)"
            )
    sent_total = "backdrop_backend_jobs_sent_total"
    sent = sum_of(front_after, sent_total) - sum_of(front_before, sent_total)
    backend_jobs = sum_of(back_after, "backdrop_jobs_total") - sum_of(back_before, "backdrop_jobs_total")
    long_wait = figure(front_after, "backdrop_jobs_total", outcome="refused", reason="long_wait") - figure(
        front_before, "backdrop_jobs_total", outcome="refused", reason="long_wait"
    )
    print(
        f"  sent to the backend (front's count) {sent:.0f}, jobs the backend counted {backend_jobs:.0f}, admitted "
        f"{len(admitted)}; the front counted {long_wait:.0f} refused long_wait"
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py line", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--cap", type=float, default=10.0, help="the front's MAX_WAIT_S")
    parser.add_argument("--service-time", type=float, default=0.5, help="the stand-in's seconds per job (S)")
    parser.add_argument("--burst", type=int, default=40, help="visitors who come at once")
    parser.add_argument("--rate", type=float, default=6.0, help="visitors a second after the burst")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long they keep coming")
    parser.add_argument("--cold", action="store_true", help="no warm runs: the flood meets a front just started")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.sched_setaffinity(0, FRONT_CORES)  # the visitors, beside the front
    print(f"load average {os.getloadavg()[0]:.2f}")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main(sys.argv[1:])
