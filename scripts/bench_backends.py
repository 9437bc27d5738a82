"""Benchmark several backends behind one front: throughput with 1, 2 and 4, an uneven pair, and one killed mid-run.

    python scripts/bench.py backends [--callers 48] [--service-time 0.5] [--fast-service-time 0.25]

Every backend is the real private app around the stand-in pipeline (a sleep instead of the GPU), a process of its
own (`bench.py --serve-backend`); the front is `public_space/app.py` with `BACKEND` set to the comma-joined list.
Nothing is pinned to a core: up to six backend processes, the front and the callers share the machine's cores
(pinning four backends to one core of two would measure that core, not the routing). Each caller is a fresh
gradio_client Client, all started at once; before each measured run a warm round of two callers per backend gives
the relay each backend's figures. Prints, all measured in this one run:
- the makespan of N callers on 1, 2 and 4 backends of S seconds, its ratio to the one-backend makespan and the
  throughput multiple; the multiple of the rate at which jobs finished once they did (first to last finish: the
  callers' simultaneous start-up left out); and the same makespans for the relay's own `Backends` driving the
  same backends from this process, with no front and no gradio_client (the routing alone, without their CPU; these
  run first, and so every backend has run many jobs before the runs through the front);
- a pair of S_fast and S backends against the best possible split: on paper N / (1/S_fast + 1/S), and as measured,
  1 / (1/M_fast + 1/M) where M_fast and M are the makespans of the same N callers on each backend alone (the pair
  finishing together, each at the pace it kept alone, per-job and start-up overheads included); for the relay
  alone, how many jobs each of the pair ran;
- two backends of S, one killed (SIGKILL) halfway: LOST jobs, split into those that had started and those that had
  not (must be none), and whether every other job finished;
- per run: the queued callers who saw their place in line, and the median error of the first ETA each was shown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import API, CORES, PHOTO, ROOT, SSL, PhotoBytes, address, free_port, run_callers, start

sys.path.insert(0, str(ROOT / "public_space"))
from backends import Backend  # the public Space's own relay (no gradio)
from pool import Backends
from relay import LOST

QUIET = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
ETA = re.compile(r"about (\d+(?:\.\d+)?) (s|min)")


@dataclass
class Record:
    submitted: float = 0.0
    finished: float = 0.0
    statuses: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None

    @property
    def started(self) -> bool:
        return any(text.startswith("Working on your photo") for _, text in self.statuses)


@dataclass
class Run:
    records: list[Record]
    makespan: float
    backends: int

    @property
    def finish_rate(self) -> float:
        """Jobs per second from the first finish to the last."""
        finishes = sorted(r.finished for r in self.records)
        return (len(finishes) - 1) / (finishes[-1] - finishes[0])


def start_backend(service_time: float, token: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--serve-backend", str(port)]
    command += ["--service-time", str(service_time)]
    headers = {"Authorization": f"Bearer {token}"}
    process = start(command, {**QUIET, "BACKEND_TOKEN": token}, f"{url}config", set(CORES), headers)
    return url, process


def start_front(backends: Sequence[str], token: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**QUIET, "BACKEND": ",".join(backends), "HF_TOKEN": token, "GRADIO_SERVER_PORT": str(port)}
    # Each caller is a visitor of its own address, as a proxy appends it; each sends the same photo: no result cache
    # (and no fair share: a warm round and a measured run come from the same addresses).
    env |= {"TRUSTED_PROXY_HOPS": "1", "MAX_JOBS_PER_VISITOR": "0", "VISITOR_RATE": "", "RESULT_CACHE_ENTRIES": "0"}
    return url, start([sys.executable, str(ROOT / "public_space" / "app.py")], env, url, set(CORES))


def call(client: object) -> Record:
    from gradio_client import handle_file

    record = Record(submitted=time.monotonic())
    job = client.submit(handle_file(str(PHOTO)), "casual", "male", api_name=API)
    try:
        for output in job:  # each intermediate status, as it arrives
            record.statuses.append((time.monotonic(), output[2]))
        status = job.result()[2]
        record.statuses.append((time.monotonic(), status))
    except Exception as error:  # the visitor's sentence
        record.error = str(error)
    record.finished = time.monotonic()
    return record


def measure(backends: Sequence[str], callers: int, token: str, during: threading.Timer | None = None) -> Run:
    """N fresh callers at once through a front over `backends`, after a warm round of two callers per backend."""
    from gradio_client import Client

    front, process = start_front(backends, token)
    try:

        def clients(n: int) -> list:
            return [
                Client(front, token=False, verbose=False, ssl_verify=SSL, headers={"X-Forwarded-For": address(i)})
                for i in range(n)
            ]

        run_callers(clients(2 * len(backends)), call)
        fresh = clients(callers)
        if during is not None:
            during.start()
        records, makespan = run_callers(fresh, call)
    finally:
        process.kill()
    return Run(records, makespan, len(backends))


def relay_alone(backends: Sequence[str], callers: int, token: str) -> tuple[float, list[int]]:
    """The makespan of N jobs sent at once by the relay's own `Backends`, in this process, after a warm round;
    and how many of them each backend ran."""
    photo = PhotoBytes(PHOTO.read_bytes())

    async def run() -> tuple[float, list[int]]:
        pool = Backends([Backend(url, token) for url in backends])

        async def one() -> float:
            async for _ in pool.predict(photo, "casual", "male"):
                pass
            return time.monotonic()

        await asyncio.gather(*(one() for _ in range(2 * len(backends))))
        before = [backend.figures.finished for backend in pool.backends]
        started = time.monotonic()
        makespan = max(await asyncio.gather(*(one() for _ in range(callers)))) - started
        return makespan, [backend.figures.finished - b for backend, b in zip(pool.backends, before, strict=True)]

    return asyncio.run(run())


def eta_error(record: Record) -> float | None:
    """|when the first ETA shown said the job would finish - when it did| / how long it took from then."""
    shown = [(t, m) for t, text in record.statuses if (m := ETA.search(text))]
    if not shown or record.error:
        return None
    shown_at, match = shown[0]
    eta = float(match[1]) * (60 if match[2] == "min" else 1)
    return abs(shown_at + eta - record.finished) / (record.finished - shown_at)


def errors(run: Run) -> str:
    """How many callers got an error, and which."""
    counts = Counter(record.error for record in run.records if record.error)
    return f"errors: {sum(counts.values())}" + (f" {dict(counts)}" if counts else "")


def place_and_eta(run: Run) -> str:
    done = sorted((r for r in run.records if not r.error), key=lambda r: r.finished)
    queued = done[run.backends :]  # each backend's first job started at once; everyone else waited
    saw = sum(any(" in line" in text for _, text in r.statuses) for r in queued)
    errors = [e for r in queued if (e := eta_error(r)) is not None]
    median = f"{100 * statistics.median(errors):.1f} %" if errors else "n/a"
    return f"saw their place {saw}/{len(queued)}, median first-ETA error {median} (n={len(errors)})"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py backends", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--callers", type=int, default=48, help="concurrent callers per run (N)")
    parser.add_argument("--service-time", type=float, default=0.5, help="the stand-in's seconds per job (S)")
    parser.add_argument("--fast-service-time", type=float, default=0.25, help="the faster backend of the pair")
    args = parser.parse_args(argv)
    n, s, fast_s = args.callers, args.service_time, args.fast_service_time
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    token = secrets.token_urlsafe(16)
    print(f"{len(CORES)} cores shared by all processes; N = {n} callers, S = {s} s")
    processes: list[subprocess.Popen] = []
    try:
        same = []
        for _ in range(4):
            url, process = start_backend(s, token)
            same.append(url)
            processes.append(process)
        fast, process = start_backend(fast_s, token)
        processes.append(process)
        doomed, doomed_process = start_backend(s, token)
        processes.append(doomed_process)
        time.sleep(2 + s)  # the warm-ups

        # The relay's own Backends first: the routing alone, and it warms every backend (many jobs behind each
        # one's average job time, as on a server that has been up a while).
        alone = {k: relay_alone(same[:k], n, token)[0] for k in (1, 2, 4)}
        fast_by_itself = relay_alone([fast], n, token)[0]
        pair_alone, split = relay_alone([same[0], fast], n, token)
        relay_alone([doomed], 8, token)
        print(
            "the relay's Backends alone (no front, no gradio_client): makespans "
            + ", ".join(f"{k}: {m:.2f} s" for k, m in alone.items())
            + "; ratios to one "
            + ", ".join(f"{alone[k] / alone[1]:.3f}" for k in (2, 4))
            + "; throughput "
            + ", ".join(f"x{alone[1] / alone[k]:.2f}" for k in (2, 4))
        )
        on_paper = n / (1 / fast_s + 1 / s)
        best = 1 / (1 / fast_by_itself + 1 / alone[1])
        share = n * (1 / fast_s) / (1 / fast_s + 1 / s)
        print(
            f"    pair S = {fast_s} s + {s} s: makespan {pair_alone:.2f} s; best split on paper {on_paper:.2f} s -> "
            f"{pair_alone / on_paper:.3f}; as measured (alone {fast_by_itself:.2f} s and {alone[1]:.2f} s) "
            f"{best:.2f} s -> {pair_alone / best:.3f}; jobs on the fast / slow one {split[1]} / {split[0]} "
            f"(in proportion to 1/S: {share:.0f} / {n - share:.0f})"
        )

        runs = {k: measure(same[:k], n, token) for k in (1, 2, 4)}
        one = runs[1].makespan
        for k, run in runs.items():
            print(
                f"{k} backend{'s' if k > 1 else ' '} at S = {s} s: makespan {run.makespan:6.2f} s "
                f"(N·S/k = {n * s / k:5.2f} s), ratio to one backend {run.makespan / one:.3f}, "
                f"throughput x{one / run.makespan:.2f}; finish rate x{run.finish_rate / runs[1].finish_rate:.2f}"
            )
            print(f"    {place_and_eta(run)}; {errors(run)}")

        fast_alone = measure([fast], n, token).makespan
        pair = measure([same[0], fast], n, token)
        measured = 1 / (1 / fast_alone + 1 / one)
        print(
            f"pair S = {fast_s} s + {s} s: makespan {pair.makespan:.2f} s; best possible split on paper "
            f"{on_paper:.2f} s -> {pair.makespan / on_paper:.3f}; as measured (alone: {fast_alone:.2f} s and "
            f"{one:.2f} s) {measured:.2f} s -> {pair.makespan / measured:.3f}"
        )
        print(f"    {place_and_eta(pair)}; {errors(pair)}")

        kill_at = n * s / 4  # halfway through a two-backend run
        killed = measure([same[0], doomed], n, token, threading.Timer(kill_at, doomed_process.kill))
        lost = [i for i, r in enumerate(killed.records) if r.error == LOST]
        other = [r.error for r in killed.records if r.error and r.error != LOST]
        lost_unstarted = [i for i in lost if not killed.records[i].started]
        finished = sum(r.error is None for r in killed.records)
        print(
            f"kill one of two at {kill_at:.1f} s: makespan {killed.makespan:.2f} s; finished {finished}/{n}; "
            f"LOST {len(lost)} (callers {lost}), of which had not started: {len(lost_unstarted)}; other errors {other}"
        )
        print(f"    {place_and_eta(killed)}")
    finally:
        for process in processes:
            process.kill()
