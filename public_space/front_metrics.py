"""What the public app counts, for its maintainer's `/metrics` (Prometheus' format, by prometheus_client).

Every figure is defined here, and counted through `FrontMetrics` alone. No label or value ever names a visitor,
an account, a photo or a backend's address: backends are labelled by their place ("backend 1 of 2").

The app counts only when it has a metrics token (METRICS_TOKEN): without one there is no /metrics route and so no
reader, and the app gets `NoMetrics`, whose jobs count nothing (`bench.py counting` measures the difference).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pool import Backends
from relay import Busy, GpuRefused, InputRefused, Lost, RepeatCrash
from visitors import TurnedAway
from waiting import LineTooLong

OUTCOMES = ("done", "failed", "cancelled", "lost")
REFUSALS = ("fair_share", "rate", "bad_input", "queue_full", "long_wait", "repeat_crash", "gpu_quota")
SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class JobCount:
    """One request, from its admission until it ends however it ends, as the app reports it (a context manager).

    This one counts nothing: it is what `NoMetrics` gives. `FrontMetrics` gives a `CountedJob`.
    """

    def __enter__(self) -> JobCount:
        return self

    def run(self) -> None:
        """The backend started the job (the app may say so more than once)."""

    def done(self) -> None:
        """The job's result is here."""

    def ended_by(self, error: Exception) -> None:
        """The job ended by `error`, which the app caught to tell its visitor why."""

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        pass


class NoMetrics:
    """The app without a metrics token: nothing can read figures, so none are kept."""

    def job(self) -> JobCount:
        return JobCount()


class FrontMetrics:
    """One registry per app (tests run several apps in one process): jobs by outcome, waiting and running now,
    wait and run times, each backend's health and counts, and the bytes of files kept."""

    def __init__(self, pool: Backends | None = None, kept_bytes: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = Counter(
            "backdrop_jobs", "Jobs by outcome; refusals by reason.", ["outcome", "reason"], registry=self.registry
        )
        for outcome in OUTCOMES:
            self.jobs.labels(outcome, "")
        for reason in REFUSALS:
            self.jobs.labels("refused", reason)
        self.waiting = Gauge("backdrop_jobs_waiting", "Jobs admitted and not yet running.", registry=self.registry)
        self.running = Gauge("backdrop_jobs_running", "Jobs running on a backend now.", registry=self.registry)
        self.wait_s = Histogram(
            "backdrop_wait_seconds", "From admission to the job's start.", buckets=SECONDS, registry=self.registry
        )
        self.run_s = Histogram(
            "backdrop_run_seconds", "From a done job's start to its result.", buckets=SECONDS, registry=self.registry
        )
        kept = Gauge("backdrop_files_kept_bytes", "Bytes of uploads and results kept on disk.", registry=self.registry)
        kept.set_function(kept_bytes or (lambda: 0.0))
        if pool is not None:
            self.registry.register(_PoolCollector(pool))

    def job(self) -> JobCount:
        return CountedJob(self)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountedJob(JobCount):
    """A job counted: waiting from admission, running from the backend's start, then its outcome, told from how it
    ended (`done`, the error the app caught, or the exception it ended by)."""

    def __init__(self, metrics: FrontMetrics) -> None:
        self.metrics = metrics
        self.outcome: tuple[str, str] | None = None
        self.started = time.monotonic()
        self.running_since: float | None = None

    def __enter__(self) -> JobCount:
        self.metrics.waiting.inc()
        return self

    def run(self) -> None:
        if self.running_since is None:
            self.running_since = time.monotonic()
            self.metrics.waiting.dec()
            self.metrics.running.inc()
            self.metrics.wait_s.observe(self.running_since - self.started)

    def done(self) -> None:
        self.outcome = ("done", "")
        if self.running_since is not None:
            self.metrics.run_s.observe(time.monotonic() - self.running_since)

    def ended_by(self, error: Exception) -> None:
        self.outcome = outcome_of(error)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        (self.metrics.running if self.running_since is not None else self.metrics.waiting).dec()
        self.metrics.jobs.labels(*(self.outcome or outcome_of(error))).inc()


def outcome_of(error: BaseException | None) -> tuple[str, str]:
    """How a job that ended by `error` is counted: by the error's type, never by its text."""
    if error is None:  # ended with neither a result nor an error
        return ("failed", "")
    if not isinstance(error, Exception):  # Stop, or the visitor left (CancelledError, GeneratorExit)
        return ("cancelled", "")
    if isinstance(error, TurnedAway):  # the visitor's fair share: jobs at once, or the rate
        return ("refused", error.reason)
    if isinstance(error, gr.Error):  # the request's input: no photo, an unknown choice, a photo that cannot be used
        return ("refused", "bad_input")
    if isinstance(error, Busy):
        return ("refused", "queue_full")
    if isinstance(error, LineTooLong):
        return ("refused", "long_wait")
    if isinstance(error, RepeatCrash):
        return ("refused", "repeat_crash")
    if isinstance(error, GpuRefused):
        return ("refused", "gpu_quota")
    if isinstance(error, InputRefused):
        return ("refused", "bad_input")
    if isinstance(error, Lost):
        return ("lost", "")
    return ("failed", "")


class _PoolCollector:
    """Each backend's figures, read from the pool at each scrape."""

    def __init__(self, pool: Backends) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("backdrop_backend_up", "1 while the backend takes jobs.", labels=["backend"])
        sent = CounterMetricFamily("backdrop_backend_jobs_sent", "Jobs that joined its queue.", labels=["backend"])
        moved = CounterMetricFamily(
            "backdrop_backend_jobs_moved", "Jobs it had that were sent again when it went away.", labels=["backend"]
        )
        resent = CounterMetricFamily(
            "backdrop_jobs_resent", "Jobs sent again when their backend went away, by what they did.", labels=["after"]
        )
        resent.add_metric(["waiting"], self.pool.resends.waiting)
        resent.add_metric(["running"], self.pool.resends.running)
        for backend in self.pool.backends:
            up.add_metric([backend.label], 0.0 if backend.down else 1.0)
            sent.add_metric([backend.label], backend.sent)
            moved.add_metric([backend.label], backend.moved)
        yield from (up, sent, moved, resent)

    def describe(self) -> Iterator[Any]:
        return iter(())
