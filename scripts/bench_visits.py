"""Visitors as a browser is one, for the benches that follow each visitor's run (bench.py restart, bench.py line).

Each visit uploads its photo, joins the public app's queue in a session of its own, reads the event stream to its
end and fetches the two pictures (async httpx: cheap, so that many visitors leave the cores to the apps), all from
an address of its own (the X-Forwarded-For entry a proxy appends; the front must believe one hop). Also: the
figures an app serves at /metrics to its token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx
from bench import address
from prometheus_client.parser import text_string_to_metric_families

RUNNING = "Working on your photo"  # how the front's status line begins once the backend took the job in
GPU_WAIT = "Waiting for the GPU"  # ... while it waits for the GPU in the gate's second slot (not yet started)


@dataclass
class Visit:
    """One visitor's run, in time.monotonic() seconds."""

    number: int
    began: float = 0.0  # before the upload
    joined: float | None = None  # the queue took the run (the upload done)
    started: float | None = None  # the first status line that says the GPU works on it
    ended: float | None = None  # its result or its error
    statuses: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.ended is not None and self.error is None

    @property
    def total(self) -> float:
        return (self.ended or time.monotonic()) - self.began


class Front:
    """A public app on loopback, as its visitors reach it."""

    def __init__(self, url: str, http: httpx.AsyncClient, photo: tuple[str, bytes, str]) -> None:
        self.url = url
        self.http = http
        self.photo = photo  # (name, content, type), as a page uploads it
        self.fn_index: int | None = None

    async def visit(self, record: Visit) -> Visit:
        """The visitor's run, from address(record.number), recorded as it goes; a failure is recorded, not raised."""
        record.began = time.monotonic()
        headers = {"x-forwarded-for": address(record.number)}
        try:
            await self._run(record, headers)
        except (httpx.HTTPError, ValueError, KeyError) as error:  # the front broke off: that is an outcome too
            record.error = f"({type(error).__name__})"
        record.ended = time.monotonic()
        return record

    async def _run(self, record: Visit, headers: dict[str, str]) -> None:
        if self.fn_index is None:
            config = (await self.http.get(f"{self.url}config")).json()
            self.fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "predict_api")
        upload = await self.http.post(f"{self.url}gradio_api/upload", files={"files": self.photo}, headers=headers)
        image = {"path": upload.raise_for_status().json()[0], "meta": {"_type": "gradio.FileData"}}
        session = uuid.uuid4().hex
        body = {"data": [image, "casual", "female"], "fn_index": self.fn_index, "session_hash": session}
        (await self.http.post(f"{self.url}gradio_api/queue/join", json=body, headers=headers)).raise_for_status()
        record.joined = time.monotonic()
        params = {"session_hash": session}
        async with self.http.stream("GET", f"{self.url}gradio_api/queue/data", params=params, headers=headers) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_generating":
                    now = time.monotonic()
                    text = status_of(message["output"]["data"][-1], record.statuses[-1][1] if record.statuses else "")
                    record.statuses.append((now, text))
                    if record.started is None and text.startswith(RUNNING) and GPU_WAIT not in text:
                        record.started = now
                if message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    if not message.get("success"):
                        record.error = str(output.get("error"))
                        return
                    for item in output["data"][:2]:
                        if isinstance(item, dict) and item.get("url"):
                            (await self.http.get(item["url"], headers=headers)).raise_for_status()
                    return
        record.error = "(the stream ended before the result)"


def status_of(value: object, last: str) -> str:
    """The status line a generator step sends: the whole line, or (Gradio streams a generator's later outputs as
    diffs) the operations that make it from the last one: [["replace", [], line]] or [["append", [], more]]."""
    if not isinstance(value, list):
        return str(value)
    for operation, _path, part in value:
        last = str(part) if operation == "replace" else last + str(part) if operation == "append" else last
    return last


def metrics(url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """An app's /metrics: {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).raise_for_status().text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def figure(figures: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent), e.g. figure(m, "backdrop_jobs_total", outcome="lost", reason="")."""
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


def sum_of(figures: dict, name: str) -> float:
    """All samples of one name, whatever their labels."""
    return sum(value for (sample, _), value in figures.items() if sample == name)


def errors(visits: list[Visit]) -> str:
    """How many visits ended in an error, and with which sentences."""
    counts = Counter(v.error for v in visits if v.error)
    return f"{sum(counts.values())}" + (f" {dict(counts)}" if counts else "")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")
