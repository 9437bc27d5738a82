"""One backend as the pool (pool.py) keeps it: its routing figures (`Figures`: the jobs sent to it and when it said
they would finish, how fast it finishes them), its health and endpoint (`Backend`: down or up, probed in the
background while down, how long its outages last), and the counts the metrics read. The protocol to one backend is
in relay.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass

import httpx

import relay
from front_settings import BACKEND_RETRY_S, BACKEND_WAKE_TIMEOUT
from relay import (
    Endpoint,
    Finished,
    NotReady,
    Queued,
    RelayError,
    Started,
    StreamBroke,
    Update,
)

logger = logging.getLogger("backdrop.relay")  # the same logger as relay.py: all the relay's log lines under one name

RETRY_EVERY_S = 2.0  # while every backend is down, a waiting visitor's tries
RETRY_DOWN_MAX_S = 60.0
JOINS_AT_ONCE = 4
GAPS_KEPT = 20  # a backend's observed interval is the mean of its last this many gaps between two completions
OUTAGES_KEPT = 5  # how long a backend takes to come back: the mean of its last this many outages


@dataclass
class SentJob:
    """One job sent to a backend, from the moment it was routed there until its stream ends."""

    session: str
    endpoint: Endpoint | None = None
    event_id: str | None = None
    due: float | None = None  # when the backend last said it would finish (monotonic): place ETA, then start ETA


class Figures:
    """What routing knows of one backend: the jobs sent to it and not yet over, the observed time between two
    completions while busy (`interval`), and the time it announced for its latest job to start (`service`:
    Gradio's `process_starts` ETA, which the private app's GPU gate sets to the expected time of a job starting
    now, GPU backlog included; it stands in for `interval` until one is seen)."""

    def __init__(self) -> None:
        self.jobs: dict[str, SentJob] = {}
        self.service: float | None = None
        self.finished = 0  # jobs it finished for this relay
        self._gaps: deque[float] = deque(maxlen=GAPS_KEPT)
        self._last_completion: float | None = None

    @property
    def interval(self) -> float | None:
        """The mean time between two completions while busy (a mean: completions are read in bursts), or None."""
        return sum(self._gaps) / len(self._gaps) if self._gaps else None

    @property
    def gap(self) -> float | None:
        """The expected time between two of its completions while busy: observed if seen, else announced, or None."""
        return self.interval or self.service

    def expected_finish(self, now: float, default_gap: float) -> float:
        """Seconds from `now` until a job sent now would finish here: one gap after the last job already sent.

        Each job already sent ends when the backend last said it would (its place's ETA while it waits, the ETA
        announced at its start once started); each one with no announcement yet adds one more gap. A job past the
        time announced for it is not over: the overdue ones still hold their places, one gap each from now (a
        stalled backend would otherwise look idle and draw every new job).
        """
        gap = self.gap or default_gap
        dues = [job.due - now for job in self.jobs.values() if job.due is not None]
        overdue = sum(due <= 0 for due in dues)
        unannounced = len(self.jobs) - len(dues)
        return max([overdue * gap, *dues]) + (unannounced + 1) * gap

    def note(self, job: SentJob, update: Update) -> None:
        """Keep what the backend announces about a job: its expected finish while it waits, and from its start the
        time it announced then (the GPU gate's estimate for a job starting now)."""
        if isinstance(update, Queued) and update.eta is not None:
            job.due = update.received + update.eta
        elif isinstance(update, Started):
            job.due = None
            if update.eta:
                self.service = update.eta
                job.due = update.received + update.eta

    def completed(self, now: float) -> None:
        self.finished += 1
        if self._last_completion is not None:  # busy since the last one: the gap is one job's share of its time
            self._gaps.append(now - self._last_completion)
        self._last_completion = now if self.jobs else None


class Backend:
    """One private Space (an `owner/name` id or a URL) as the pool keeps it: how to reach it (one token, a shared
    connection pool, the endpoint found once for all callers), its routing figures, and its health."""

    def __init__(
        self,
        target: str,
        token: str | None,
        *,
        wake_timeout: float = BACKEND_WAKE_TIMEOUT,
        retry_after: float = BACKEND_RETRY_S,  # a backend that failed is probed again after this, doubling
        name: str = "the backend",
    ) -> None:
        self.target = target
        self.wake_timeout = wake_timeout
        self.retry_after = retry_after
        self.name = name  # for log lines, which never carry the address
        self.label = name  # for the metrics: the pool sets "backend i of n"
        self.figures = Figures()
        self.down = False
        self.sent = 0  # jobs that joined its queue
        self.moved = 0  # jobs sent here that were sent again (here or elsewhere) after it went away
        self.down_since: float | None = None  # while down (monotonic)
        self.outages: deque[float] = deque(maxlen=OUTAGES_KEPT)  # how long it took to come back, the last few times
        self._failures = 0
        self._headers = {"x-hf-authorization": f"Bearer {token}"} if token else {}
        self._token = token
        self._endpoint: Endpoint | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._probing = False
        self._soon_until = 0.0  # while a backend that went away is expected back, it is probed every RETRY_EVERY_S
        self._lookup: asyncio.Task[Endpoint] | None = None  # the endpoint lookup under way, or the last one
        self._lookup_again_at = 0.0  # a failed lookup's answer stands until then (monotonic)
        self._waking: asyncio.Task[None] | None = None
        self._joining = asyncio.Semaphore(JOINS_AT_ONCE)

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:  # created on first use, inside the server's event loop
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            timeout = httpx.Timeout(10.0, read=60.0)  # the backend sends a heartbeat every 15 s
            self._http = httpx.AsyncClient(headers=self._headers, limits=limits, timeout=timeout)
        return self._http

    async def accept(self, photo: bytes, category: str, gender: str, headers: dict[str, str]) -> SentJob:
        """Join the backend's queue with a fresh session; the job counts as sent here from the first moment."""
        job = SentJob(session=uuid.uuid4().hex)
        self.figures.jobs[job.session] = job  # before any await: the next routing decision already counts it
        try:
            job.endpoint = endpoint = await self._resolve()
            async with self._joining:  # a few photos at a time: a burst of visitors would pile up copies
                body = relay.join_body(endpoint.fn_index, job.session, photo, category, gender)

                def joined_late(event_id: str) -> None:
                    self._cancel_soon(endpoint, job.session, event_id)

                job.event_id = await relay.join(self.http, endpoint, body, headers, self.name, joined_late=joined_late)
                del body
        except BaseException:
            del self.figures.jobs[job.session]
            raise
        self.sent += 1
        self.mark_up()
        return job

    async def follow(self, job: SentJob) -> AsyncIterator[Update]:
        """The job's updates; closing this early cancels the job. Raises StreamBroke if the stream ends first."""
        try:
            async for update in relay.follow(self.http, job.endpoint, job.session, job.event_id, self.name):
                self.figures.note(job, update)
                if isinstance(update, Finished):  # over before its visitor has it: the wait line no longer counts it
                    del self.figures.jobs[job.session]
                    self.figures.completed(time.monotonic())
                yield update
        except StreamBroke:
            self._endpoint = None
            raise
        finally:
            if self.figures.jobs.pop(job.session, None) is not None:  # the visitor left, pressed Stop, or it broke
                self._cancel_soon(job.endpoint, job.session, job.event_id)

    def mark_down(self, reason: str, *, restarting: bool = False) -> None:
        """Skip this backend for new jobs, and probe it in the background until it answers: backing off, or, for one
        that went away while serving (`restarting`: a redeploy, a crash), every RETRY_EVERY_S for the wake timeout,
        as it should be back soon and the pool wants it back as soon as it is."""
        self._endpoint = None
        if restarting:
            self._soon_until = time.monotonic() + self.wake_timeout
        if self.down:  # the probe counts its own failures; many jobs reporting one outage are one failure
            return
        self.down, self._failures, self.down_since = True, self._failures + 1, time.monotonic()
        logger.warning(
            "%s is down (%s); it is tried again in %.0f s.", self.name.capitalize(), reason, self._retry_s()
        )
        if not self._probing:
            self._probing = True
            self._spawn(self._probe())

    def _retry_s(self) -> float:
        if time.monotonic() < self._soon_until:
            return RETRY_EVERY_S
        return min(RETRY_DOWN_MAX_S, self.retry_after * 2 ** max(0, self._failures - 1))

    def mark_up(self) -> None:
        if self.down:
            logger.info("%s answers again.", self.name.capitalize())
            if self.down_since is not None:
                self.outages.append(time.monotonic() - self.down_since)
        self.down, self._failures, self.down_since = False, 0, None

    def back_in(self, now: float) -> float | None:
        """Seconds until this down backend should answer again, judged by its last outages; None if none seen."""
        if not self.outages or self.down_since is None:
            return None
        return max(0.0, sum(self.outages) / len(self.outages) - (now - self.down_since))

    async def _probe(self) -> None:
        try:
            while self.down:
                await asyncio.sleep(self._retry_s())
                if not self.down:
                    return
                try:
                    await relay.status(self.http, await self._resolve(), self.name)
                except (NotReady, RelayError):
                    self._failures += 1
                    self._endpoint = None
                    continue
                self.mark_up()
        finally:
            self._probing = False

    async def current_build(self) -> str | None:
        """The build id this backend says it has now, asked with a GET that runs nothing; None if it cannot say."""
        try:
            return await relay.status(self.http, await self._resolve(), self.name)
        except (NotReady, RelayError, httpx.HTTPError):
            return None

    async def _resolve(self) -> Endpoint:
        """The backend's endpoint, looked up once for all callers: concurrent ones share the lookup under way, and
        a failed lookup's answer stands for RETRY_EVERY_S, so many waiting visitors make one Hub call, not one each.
        """
        if self._endpoint is not None:
            return self._endpoint
        if self._lookup is None or (self._lookup.done() and time.monotonic() >= self._lookup_again_at):
            self._lookup = asyncio.get_running_loop().create_task(self._look_up())
            self._lookup.add_done_callback(self._looked_up)
        return await asyncio.shield(self._lookup)  # a caller that leaves does not cancel the others' lookup

    def _looked_up(self, lookup: asyncio.Task[Endpoint]) -> None:
        failed = lookup.cancelled() or lookup.exception() is not None  # retrieved here: no "never retrieved" noise
        self._lookup_again_at = time.monotonic() + (RETRY_EVERY_S if failed else 0.0)

    async def _look_up(self) -> Endpoint:
        try:
            self._endpoint = await relay.look_up(self.http, self.target, self._token, self.name)
        except NotReady as not_ready:
            if not_ready.wake and (self._waking is None or self._waking.done()):  # one wake request at a time
                self._waking = self._spawn(self._wake(not_ready.wake))
            raise
        return self._endpoint

    def _wake(self, host: str) -> Coroutine[object, object, None]:
        return relay.wake(self.http, host)

    def _cancel_soon(self, endpoint: Endpoint | None, session: str, event_id: str | None) -> None:
        """Cancel in a task of its own: the caller may itself be a task being cancelled."""
        if endpoint is not None and event_id is not None:
            self._spawn(relay.cancel(self.http, endpoint, session, event_id))

    def _spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
