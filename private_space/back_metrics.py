"""What the private app counts, for its maintainer's `/metrics` (Prometheus' format, by prometheus_client).

Every figure is defined here and counted through `BackMetrics` (and, for a join its full queue refused, the
middleware `CountFullQueue`). Served only with BACKEND_TOKEN. No label or value names a caller, a photo or a model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from guard import QUEUE_JOIN, ASGIApp, Message, Receive, Scope, Send

OUTCOMES = ("done", "failed", "cancelled")
REFUSALS = ("bad_input", "queue_full", "gpu_quota")  # gpu_quota: ZeroGPU refused the job's GPU call (app.py)
SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class BackMetrics:
    """One registry per app: jobs by outcome, waiting (Gradio's queue) and running now, GPU wait and run times,
    and GPU seconds asked for (ZeroGPU's requested duration) and used."""

    def __init__(self, waiting: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.jobs = Counter("backdrop_jobs", "Jobs by outcome; refusals by reason.", ["outcome", "reason"], registry=r)
        for outcome in OUTCOMES:
            self.jobs.labels(outcome, "")
        for reason in REFUSALS:
            self.jobs.labels("refused", reason)
        Gauge("backdrop_jobs_waiting", "Jobs in the queue, not yet started.", registry=r).set_function(waiting)
        self.running = Gauge("backdrop_jobs_running", "Jobs being served now.", registry=r)
        self.wait_s = Histogram(
            "backdrop_wait_seconds", "From a job's decoded photo to its GPU turn.", buckets=SECONDS, registry=r
        )
        self.run_s = Histogram("backdrop_run_seconds", "A done job's time.", buckets=SECONDS, registry=r)
        self.gpu_requested = Counter("backdrop_gpu_requested_seconds", "GPU seconds asked for (ZeroGPU).", registry=r)
        self.gpu_used = Counter("backdrop_gpu_used_seconds", "GPU seconds used.", registry=r)

    @contextlib.contextmanager
    def job(self) -> Iterator[JobOutcome]:
        """One job served, for the length of the block: done if the block ends without an error, cancelled if it
        is cancelled, else what the app says (`JobOutcome.refused`), or failed."""
        outcome = JobOutcome()
        started = time.perf_counter()
        self.running.inc()
        try:
            yield outcome
            outcome.labels = ("done", "")
            self.run_s.observe(time.perf_counter() - started)
        except Exception:
            outcome.labels = outcome.labels or ("failed", "")
            raise
        finally:
            self.running.dec()
            self.jobs.labels(*(outcome.labels or ("cancelled", ""))).inc()

    @contextlib.contextmanager
    def gpu_turn(self, waiting_since: float) -> Iterator[None]:
        """A job's time on the GPU (`time.perf_counter()` seconds), after waiting for it since `waiting_since`."""
        on = time.perf_counter()
        self.wait_s.observe(on - waiting_since)
        try:
            yield
        finally:
            self.gpu_used.inc(time.perf_counter() - on)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class JobOutcome:
    """One job's outcome, as the app tells it: its (outcome, reason) labels, None until it ends."""

    def __init__(self) -> None:
        self.labels: tuple[str, str] | None = None

    def refused(self, reason: str) -> None:
        self.labels = ("refused", reason)


class CountFullQueue:
    """ASGI middleware (inside the guard): a queue join that Gradio answers 503 (its queue is full, the only 503 it
    gives a join) counts as a job refused for `queue_full`. Such a job never reaches the endpoint."""

    def __init__(self, app: ASGIApp, *, metrics: BackMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(QUEUE_JOIN):
            await self.app(scope, receive, send)
            return

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503:
                self.metrics.jobs.labels("refused", "queue_full").inc()
            await send(message)

        await self.app(scope, receive, counting)
