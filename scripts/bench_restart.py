"""Benchmark a backend restart (issue 20): is anything lost, and what does it add to the wait?

    python scripts/bench.py restart [--callers 12] [--service-time 1.0 0.15] [--down 8] [--signals TERM KILL]
                                    [--rolling-callers 8] [--steady 20] [--after 30] [--skip-one] [--skip-rolling]

Each backend is the real private app around the stand-in (S seconds of "GPU" a job), a process of its own
(`bench.py --serve-backend`) that is stopped with a signal and started again on the same port; its start-up is
timed from the process's start to its first answer to /config. The front is `public_space/app.py` with its
production defaults (fair share on, METRICS_TOKEN set), no result cache; every visitor runs a 1024×768 JPEG from
an address of its own, as a browser does (bench_visits.py). For each S:
1. One backend: N visitors join one after the other (20 ms apart); once all are in line and the GPU works on the
   first, the backend is stopped (SIGTERM, then in a second run SIGKILL) and started again D seconds later. Prints
   how many got their result, how many an error and which sentences, and the added wait: each visitor's time minus
   the same visitor's (the same place in line) in a baseline run with no restart, p50 and max, against D plus the
   start-up; and what the front counted meanwhile (backdrop_jobs_resent_total by what the job did, and
   backdrop_jobs_total for outcome "lost" and refusal "repeat_crash").
2. Two backends, a rolling restart under a steady stream: M visitors in a closed loop (each a new address per
   run); after --steady seconds, backend 1 is stopped (SIGTERM), started again D s later, and once it answers,
   backend 2 the same. Prints whether every run got its result, the jobs done per second during the rolling
   restart (from the first stop until the second backend answers) against the steady rate before it (goal: at
   least 45 %) and in the --after seconds after it, when the front marked each backend down and up again (a
   backend it marked down is taken back when its probe, or a job with no other backend up, finds it answering),
   and the front's counts.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import psutil
from bench import BACKEND_CORES, CORES, FRONT_CORES, QUIET, backend_command, free_port, photo_1024x768, start_front
from bench_visits import Front, Visit, errors, figure, metrics, percentile

# The front as in production but for the result cache (every visitor sends the same photo) and the metrics token.
FRONT_ENV = {"MAX_JOBS_PER_VISITOR": "2", "VISITOR_RATE": "6/minute", "VISITOR_FILES": "50"}
GAP_S = 0.02  # between two visitors joining the line
SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


class BackendProcess:
    """One private app around the stand-in on a port of its own, which it keeps when it is started again."""

    def __init__(self, service_time: float, token: str, cores: set[int]) -> None:
        self.service_time, self.token, self.cores = service_time, token, cores
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it; the seconds from the process's start until it answers /config."""
        began = time.monotonic()
        self.process = subprocess.Popen(
            backend_command(self.port, self.service_time),
            env={**os.environ, **QUIET, "BACKEND_TOKEN": self.token},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.sched_setaffinity(self.process.pid, self.cores)
        auth = {"Authorization": f"Bearer {self.token}"}
        while time.monotonic() - began < 120:
            if self.process.poll() is not None:
                raise SystemExit(f"the backend on port {self.port} stopped at its start")
            try:
                if httpx.get(f"{self.url}config", headers=auth, timeout=1).status_code == 200:
                    return time.monotonic() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise SystemExit(f"the backend on port {self.port} did not answer in 120 s")

    def stop(self, how: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(how)
        self.process.wait(timeout=60)

    def rss(self) -> int:
        assert self.process is not None
        return psutil.Process(self.process.pid).memory_info().rss

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()


def front_process(backends: list[BackendProcess], token: str, metrics_token: str) -> tuple[str, subprocess.Popen]:
    urls = ",".join(backend.url for backend in backends)
    return start_front(urls, token, FRONT_ENV | {"METRICS_TOKEN": metrics_token})


def counted(before: dict, after: dict) -> str:
    """What the front counted between two reads of its /metrics: resends, lost jobs, repeat crashes."""

    def delta(name: str, **labels: str) -> int:
        return round(figure(after, name, **labels) - figure(before, name, **labels))

    resent = [delta("backdrop_jobs_resent_total", after=what) for what in ("waiting", "running")]
    lost = delta("backdrop_jobs_total", outcome="lost", reason="")
    crashes = delta("backdrop_jobs_total", outcome="refused", reason="repeat_crash")
    return f"backdrop_jobs_resent_total waiting {resent[0]}, running {resent[1]}; lost {lost}; repeat_crash {crashes}"


class Line:
    """Visitors who joined one after the other, their runs under way (`records` fill in as they go)."""

    def __init__(self) -> None:
        self.records: list[Visit] = []
        self._runs: list[asyncio.Task[Visit]] = []

    @classmethod
    async def join(cls, front: Front, numbers: Iterator[int], callers: int) -> Line:
        line = cls()
        for _ in range(callers):
            line.records.append(Visit(next(numbers)))
            line._runs.append(asyncio.get_running_loop().create_task(front.visit(line.records[-1])))
            await asyncio.sleep(GAP_S)
        return line

    def full(self) -> bool:
        """Every visitor is in line (or already done), and the GPU works on one of them."""
        return all(r.joined or r.ended for r in self.records) and any(r.started for r in self.records)

    async def over(self) -> list[Visit]:
        return await asyncio.gather(*self._runs)


async def until(condition: Callable[[], bool], within: float = 60.0) -> None:
    """Wait until `condition()` holds (checked every 10 ms); SystemExit if it does not `within` seconds."""
    for _ in range(int(within / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise SystemExit(f"not in {within:g} s: {condition.__doc__}")


async def one_backend(args: argparse.Namespace, service_time: float, photo: tuple[str, bytes, str]) -> None:
    token, metrics_token, numbers = secrets.token_urlsafe(16), secrets.token_urlsafe(16), itertools.count()
    backend = BackendProcess(service_time, token, BACKEND_CORES)
    first_start = backend.start()
    front_url, process = front_process([backend], token, metrics_token)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=300), limits=limits) as http:
            front = Front(front_url, http, photo)
            for _ in range(3):  # warm: the relay's figures come from real runs
                await front.visit(Visit(next(numbers)))
            baseline = await (await Line.join(front, numbers, args.callers)).over()
            totals = [record.total for record in baseline]
            print(
                f"S = {service_time} s, one backend (start-up {first_start:.1f} s), N = {args.callers}: baseline "
                f"{sum(r.done for r in baseline)}/{args.callers} done, time p50 {percentile(totals, 0.5):.1f} s, "
                f"max {max(totals):.1f} s; errors {errors(baseline)}"
            )
            for name in args.signals:
                before = metrics(front_url, metrics_token)
                joined = await Line.join(front, numbers, args.callers)
                records = joined.records
                await until(joined.full)
                await asyncio.sleep(service_time / 2)  # mid-job
                stopped_at = time.monotonic()
                in_line = sum(not r.ended for r in records)
                await asyncio.to_thread(backend.stop, SIGNALS[name])
                await asyncio.sleep(args.down)
                startup = await asyncio.to_thread(backend.start)
                back_at = time.monotonic()
                await joined.over()
                later = [r.ended - back_at for r in records if r.done and r.ended > back_at]
                added = [r.total - b.total for r, b in zip(records, baseline, strict=True)]
                done = sum(r.done for r in records)
                print(
                    f"  SIG{name} {stopped_at - records[0].began:.1f} s after the first joined ({in_line} in line), "
                    f"back after D = {args.down:g} s + start-up {startup:.1f} s = {args.down + startup:.1f} s: "
                    f"{done}/{args.callers} got their result; errors {errors(records)}"
                )
                print(
                    f"    added wait p50 {percentile(added, 0.5):.1f} s, max {max(added):.1f} s; the first result "
                    f"{min(later, default=float('nan')):.1f} s after the backend answered again"
                )
                print(f"    the front counted: {counted(before, metrics(front_url, metrics_token))}")
    finally:
        process.kill()
        backend.kill()


class UpWatch:
    """When the front marks each backend down and up (its backdrop_backend_up), read every 0.25 s in a thread."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.changes: list[tuple[float, str, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last: dict[str, bool] = {}
        while not self._stop.wait(0.25):
            try:
                figures = metrics(self.url, self.token)
            except httpx.HTTPError:
                continue
            for (name, labels), value in figures.items():
                if name == "backdrop_backend_up" and last.get(labels[0][1], True) != bool(value):  # up at first
                    last[labels[0][1]] = bool(value)
                    self.changes.append((time.monotonic(), labels[0][1], bool(value)))

    def __enter__(self) -> UpWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def rolling(args: argparse.Namespace, service_time: float, photo: tuple[str, bytes, str]) -> None:
    token, metrics_token, numbers = secrets.token_urlsafe(16), secrets.token_urlsafe(16), itertools.count(10_000)
    backends = [BackendProcess(service_time, token, set(CORES)) for _ in range(2)]
    startups = [backend.start() for backend in backends]
    front_url, process = front_process(backends, token, metrics_token)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    records: list[Visit] = []
    stopping = False
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=300), limits=limits) as http:
            front = Front(front_url, http, photo)
            await asyncio.gather(*(front.visit(Visit(next(numbers))) for _ in range(4)))  # warm

            async def visitor() -> None:
                while not stopping:
                    records.append(Visit(next(numbers)))
                    await front.visit(records[-1])

            callers = [asyncio.get_running_loop().create_task(visitor()) for _ in range(args.rolling_callers)]
            await asyncio.sleep(3 * service_time + 2)  # the loop settles
            steady_from = time.monotonic()
            await asyncio.sleep(args.steady)
            before = metrics(front_url, metrics_token)
            roll_from = time.monotonic()
            marks = []
            with UpWatch(front_url, metrics_token) as watch:
                for backend in backends:
                    await asyncio.to_thread(backend.stop, signal.SIGTERM)
                    stopped = time.monotonic()
                    await asyncio.sleep(args.down)
                    startup = await asyncio.to_thread(backend.start)
                    marks.append((stopped, time.monotonic(), startup))
                rolled = time.monotonic()
                await asyncio.sleep(args.after)
                stopping = True
                await asyncio.gather(*callers)
                after_until = time.monotonic()
            after = metrics(front_url, metrics_token)
    finally:
        process.kill()
        for backend in backends:
            backend.kill()

    def rate(since: float, until: float) -> float:
        return sum(r.done and since <= r.ended < until for r in records) / (until - since)

    steady, during, recovered = rate(steady_from, roll_from), rate(roll_from, rolled), rate(rolled, after_until)
    done = sum(r.done for r in records)
    print(
        f"S = {service_time} s, two backends (start-up {startups[0]:.1f} s, {startups[1]:.1f} s), "
        f"{args.rolling_callers} visitors in a closed loop: {done}/{len(records)} done "
        f"({'all' if done == len(records) else 'NOT all'}); errors {errors(records)}"
    )
    print(
        f"  jobs done per second: steady {steady:.2f}/s ({args.steady:g} s); during the rolling restart "
        f"{during:.2f}/s ({rolled - roll_from:.1f} s) = {100 * during / steady:.0f} % of steady (goal >= 45 %); "
        f"in the {after_until - rolled:.0f} s after it {recovered:.2f}/s"
    )
    for number, (stopped, back, startup) in enumerate(marks, start=1):
        label = f"backend {number} of 2"
        seen = [(t - roll_from, "up" if up else "down") for t, name, up in watch.changes if name == label]
        front_saw = ", ".join(f"{what} at {t:.1f} s" for t, what in seen) or "no change"
        print(
            f"  backend {number}: stopped at {stopped - roll_from:.1f} s, answering again at {back - roll_from:.1f} s "
            f"(start-up {startup:.1f} s); the front marked it {front_saw}"
        )
    print(f"  the front counted: {counted(before, after)}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py restart", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--callers", type=int, default=12, help="visitors in line on one backend (N)")
    parser.add_argument("--service-time", type=float, nargs="+", default=[1.0, 0.15], help="the stand-in's S, each")
    parser.add_argument("--down", type=float, default=8.0, help="seconds between a backend's stop and its start (D)")
    parser.add_argument("--signals", nargs="+", choices=sorted(SIGNALS), default=["TERM", "KILL"])
    parser.add_argument("--rolling-callers", type=int, default=8, help="visitors in the closed loop (M)")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of steady stream measured before")
    parser.add_argument("--after", type=float, default=30.0, help="seconds of stream measured after the roll")
    parser.add_argument("--skip-one", action="store_true", help="leave out the one-backend runs")
    parser.add_argument("--skip-rolling", action="store_true", help="leave out the rolling restart")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.sched_setaffinity(0, FRONT_CORES)  # the visitors, beside the front
    photo = ("photo.jpg", photo_1024x768(), "image/jpeg")
    print(f"photo: 1024×768 JPEG, {len(photo[1]) / 1000:.0f} kB; load average {os.getloadavg()[0]:.2f}")
    for service_time in args.service_time:
        if not args.skip_one:
            asyncio.run(one_backend(args, service_time, photo))
        if not args.skip_rolling:
            asyncio.run(rolling(args, service_time, photo))


if __name__ == "__main__":
    main(sys.argv[1:])
