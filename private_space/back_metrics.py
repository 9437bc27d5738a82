"""What the private app counts, for its maintainer's `/metrics` (Prometheus' format, by prometheus_client).

Served only with BACKEND_TOKEN. No label or value names a caller, a photo or a model.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("done", "failed", "cancelled")
REFUSALS = ("bad_input",)
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
            "backdrop_wait_seconds", "From a job's start to its GPU turn.", buckets=SECONDS, registry=r
        )
        self.run_s = Histogram("backdrop_run_seconds", "A done job's time.", buckets=SECONDS, registry=r)
        self.gpu_requested = Counter("backdrop_gpu_requested_seconds", "GPU seconds asked for (ZeroGPU).", registry=r)
        self.gpu_used = Counter("backdrop_gpu_used_seconds", "GPU seconds used.", registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
