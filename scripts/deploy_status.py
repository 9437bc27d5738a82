"""`deploy.py status`: one screen from both Spaces' /metrics (the maintainer's tokens, from the environment).

Counters are cumulative since each app started; "last hour" is the difference between this scrape and the oldest
one kept from the last hour of a `--watch` run (a single run shows totals since start, and says so).
Percentiles come from the histograms' buckets (the upper bound of the bucket that holds the rank).
Figures that newer builds add (resends, the newer refusal reasons) are shown where an app has them; a frontend
whose /metrics lacks them (an older build) says which, and nothing fails.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

Figures = dict[tuple[str, tuple], float]
REFUSALS = ("fair_share", "rate", "bad_input", "queue_full")  # always shown (0 where an app does not count one)
NEWER_REFUSALS = ("repeat_crash", "long_wait", "gpu_quota")  # shown where the app counts them
RESENT = "backdrop_jobs_resent_total"  # jobs sent again because their backend went away, by `after`
RESENT_AFTER = {"waiting": "while waiting", "running": "while running"}


def url_of(space: str) -> str:
    """A URL as it is; a Space id `owner/name` as its *.hf.space host."""
    if space.startswith(("http://", "https://")):
        return space.rstrip("/") + "/"
    return "https://" + space.replace("/", "-").replace("_", "-").replace(".", "-").lower() + ".hf.space/"


def scrape(space: str, token: str | None) -> Figures | None:
    """The app's figures, or None when it does not answer them."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{url_of(space)}metrics", headers=headers, timeout=10.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _job_key(outcome: str, reason: str = "") -> tuple[str, tuple]:
    return ("backdrop_jobs_total", (("outcome", outcome), ("reason", reason)))


def _jobs(figures: Figures, outcome: str, reason: str = "") -> float:
    return figures.get(_job_key(outcome, reason), 0.0)


def percentile(figures: Figures, base: Figures, name: str, q: float) -> str:
    buckets = sorted(
        (float(labels[0][1]), value - base.get((key, labels), 0.0))
        for (key, labels), value in figures.items()
        if key == f"{name}_bucket"
    )
    total = buckets[-1][1] if buckets else 0
    if not total:
        return "-"
    bound = next(le for le, count in buckets if count >= q * total)
    return "> 600 s" if bound == float("inf") else f"<= {bound:g} s"


def _resent(figures: Figures, after: str) -> float:
    return figures.get((RESENT, (("after", after),)), 0.0)


def screen(name: str, figures: Figures | None, base: Figures | None, since: str, *, front: bool = False) -> list[str]:
    """The lines for one app; `front`: a public app, which says which newer figures its build does not have."""
    if figures is None:
        return [f"{name}: DOWN (no answer to /metrics: not running, or the token is wrong)"]
    base = base or {}

    def delta(outcome: str, reason: str = "") -> int:
        return int(_jobs(figures, outcome, reason) - _jobs(base, outcome, reason))

    def listed(counts: dict[str, int]) -> str:
        return f"{sum(counts.values())} ({', '.join(f'{key} {n}' for key, n in counts.items())})"

    counted = [r for r in NEWER_REFUSALS if _job_key("refused", r) in figures]
    refused = {r: delta("refused", r) for r in (*REFUSALS, *counted)}
    resent = {
        shown: int(_resent(figures, after) - _resent(base, after))
        for after, shown in RESENT_AFTER.items()
        if (RESENT, (("after", after),)) in figures
    }
    lines = [
        f"{name}: up · waiting {figures.get(('backdrop_jobs_waiting', ()), 0):g}"
        f" · running {figures.get(('backdrop_jobs_running', ()), 0):g}",
        f"  {since}: done {delta('done')}, failed {delta('failed')}, lost {delta('lost')},"
        f" cancelled {delta('cancelled')}, refused {listed(refused)}",
    ]
    if resent:
        lines.append(f"  {since}: resent {listed(resent)}")
    missing = [f"refused for {r}" for r in NEWER_REFUSALS if r not in counted] + ([] if resent else ["resent"])
    if front and missing:
        lines.append(f"  not in its /metrics (an older build, or none since start): {', '.join(missing)}")
    lines.append(
        f"  wait p50 {percentile(figures, base, 'backdrop_wait_seconds', 0.5)}"
        f", p95 {percentile(figures, base, 'backdrop_wait_seconds', 0.95)}"
        f" · run p50 {percentile(figures, base, 'backdrop_run_seconds', 0.5)}"
        f", p95 {percentile(figures, base, 'backdrop_run_seconds', 0.95)}"
    )
    sent = {
        dict(labels)["backend"]: v - base.get((k, labels), 0.0)
        for (k, labels), v in figures.items()
        if k == "backdrop_backend_jobs_sent_total"
    }
    total = sum(sent.values()) or 1
    for backend, count in sorted(sent.items()):
        up = figures.get(("backdrop_backend_up", (("backend", backend),)), 0)
        lines.append(f"  {backend}: {'up' if up else 'DOWN'} · share {100 * count / total:.0f} % ({int(count)} jobs)")
    return lines


def status(
    spaces: list[tuple[str, str, str | None]], *, watch: float | None, say: Callable[[str], object] = print
) -> int:
    """Print the screen for each (title, space, token); with `watch`, again every `watch` seconds."""
    kept: deque[tuple[float, list[Figures | None]]] = deque()
    while True:
        now, scraped = time.monotonic(), [scrape(space, token) for _, space, token in spaces]
        kept.append((now, scraped))
        while kept and now - kept[0][0] > 3600:
            kept.popleft()
        first_at, first = kept[0]
        since = "since start" if first_at == now else f"last {(now - first_at) / 60:.0f} min"
        lines = []
        for i, ((title, space, _), figures) in enumerate(zip(spaces, scraped, strict=True)):
            base = first[i] if first_at != now else None
            lines += screen(f"{title} {space}", figures, base, since, front=title == "frontend")
        say("\n".join(lines))
        if watch is None:
            return 0 if all(figures is not None for figures in scraped) else 1
        time.sleep(watch)
