"""The public Space's link to the private ones: Gradio's queue protocol, one backend session per visitor request.

Why not one shared `gradio_client.Client`: a Client is one session, and the backend cancels *every* job of a
session on `/cancel` and drops all its queued jobs when its stream closes, so one visitor's Stop would kill
another's job. A Client per request costs ~110 ms (new HTTP clients, SSL contexts, config and info fetches,
a 50 ms polling loop). Here every request gets a fresh session hash on one shared pool of keep-alive
connections: isolation for the price of one queue join and one event stream.

This module speaks to one backend (`Backend`); the pool of several (`Backends`) is in backends.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from huggingface_hub import HfApi

logger = logging.getLogger("backdrop.relay")

API_NAME = "predict_api"
WAKING_STAGES = {"SLEEPING", "STOPPED", "BUILDING", "APP_STARTING", "RUNNING_BUILDING", "RUNNING_APP_STARTING"}
RETRY_EVERY_S = 2.0  # while every backend is down, a waiting visitor's tries
RETRY_DOWN_S = 10.0  # a backend that failed is probed again after this, doubling up to RETRY_DOWN_MAX_S
RETRY_DOWN_MAX_S = 60.0
JOINS_AT_ONCE = 4
GAPS_KEPT = 20  # a backend's observed interval is the mean of its last this many gaps between two completions
BUILD_HEADER = "x-backdrop-build"  # the private app's build id, on each of its responses (private_space/identity.py)

BUSY = "The service is busy, please try again in a minute."
UNAVAILABLE = "The image service is not reachable right now. Please try again in a few minutes."
LOST = "The image service stopped while working on your photo. Please try again."
FAILED = "Something went wrong while processing your photo. Please try again."


class RelayError(Exception):
    """A failure, worded for the visitor."""


class _Fault(RelayError):
    """The backend cannot take jobs: it refused our token, lacks the endpoint, or answered an unexpected error.

    Worded for the visitor, who sees it only when no backend takes the job.
    """

    def __init__(self, sentence: str, reason: str) -> None:
        super().__init__(sentence)
        self.reason = reason  # for the log line, without the address


class _NotReady(Exception):
    """The backend is asleep, starting or unreachable: worth another try until the wake deadline."""


class _StreamBroke(Exception):
    """The backend's event stream ended before the job's result: the backend stopped or the network broke."""


@dataclass(frozen=True)
class Waking:
    """The backend is asleep or starting."""


@dataclass(frozen=True)
class Queued:
    rank: int  # 0 = next in line
    eta: float | None  # seconds until this job should finish, as of `received`
    received: float  # time.monotonic() when the estimate arrived


@dataclass(frozen=True)
class Running:
    fraction: float | None
    desc: str | None


@dataclass(frozen=True)
class Finished:
    image_b64: str
    overlay_b64: str
    result_b64: str
    status: str
    build: str | None = None  # the build id of the backend that made it (its stream's BUILD_HEADER), if it said


Update = Waking | Queued | Running | Finished


@dataclass(frozen=True)
class _Endpoint:
    url: str  # the backend's root URL, ending in "/"
    fn_index: int


@dataclass
class _Job:
    """One job this relay sent to a backend, from the moment it was routed there until its stream ends."""

    session: str
    endpoint: _Endpoint | None = None
    event_id: str | None = None
    due: float | None = None  # when the backend last said it would finish (monotonic): place ETA, then start ETA
    started: float | None = None  # when the backend said it started


class Backend:
    """One private Space (an `owner/name` id or a URL) reached with one token over a shared connection pool.

    It keeps what it needs for routing: the jobs sent to it and not yet over, the observed time between two
    completions while busy (`interval`), the time it announced for its latest job to start (`service`: Gradio's
    `process_starts` ETA, which the private app's GPU gate sets to the expected time of a job starting now, GPU
    backlog included; it stands in for `interval` until one is seen), and whether it is down.
    """

    def __init__(
        self,
        target: str,
        token: str | None,
        *,
        wake_timeout: float = 180.0,
        retry_after: float = RETRY_DOWN_S,
        name: str = "the backend",
    ) -> None:
        self.target = target
        self.wake_timeout = wake_timeout
        self.retry_after = retry_after
        self.name = name  # for log lines, which never carry the address
        self.jobs: dict[str, _Job] = {}
        self.service: float | None = None
        self._gaps: deque[float] = deque(maxlen=GAPS_KEPT)
        self.finished = 0  # jobs it finished for this relay
        self.down = False
        self._failures = 0
        self._last_completion: float | None = None
        self._headers = {"x-hf-authorization": f"Bearer {token}"} if token else {}
        self._token = token
        self._endpoint: _Endpoint | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._probing = False
        self._lookup: asyncio.Task[_Endpoint] | None = None  # the endpoint lookup under way, or the last one
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

    def predict(
        self, photo: bytes, category: str, gender: str, *, ip_token: str | None = None
    ) -> AsyncIterator[Update]:
        """Run one job as its own backend session; closing this iterator early cancels that job, and only it."""
        from backends import Backends  # noqa: PLC0415 - backends.py imports this module: a top-level import is a cycle

        return Backends([self]).predict(photo, category, gender, ip_token=ip_token)

    @property
    def gap(self) -> float | None:
        """The expected time between two of its completions while busy: observed if seen, else announced, or None."""
        return self.interval or self.service

    def expected_finish(self, now: float, default_gap: float) -> float:
        """Seconds from `now` until a job sent now would finish here: one gap after the last job already sent.

        Each job already sent ends when the backend last said it would (its place's ETA while it waits, the ETA
        announced at its start once started); each one with no announcement yet adds one more gap.
        """
        gap = self.gap or default_gap
        dues = [job.due - now for job in self.jobs.values() if job.due is not None]
        unannounced = len(self.jobs) - len(dues)
        return max([0.0, *dues]) + (unannounced + 1) * gap

    async def accept(self, photo: bytes, category: str, gender: str, headers: dict[str, str]) -> _Job:
        """Join the backend's queue with a fresh session; the job counts as sent here from the first moment."""
        job = _Job(session=uuid.uuid4().hex)
        self.jobs[job.session] = job  # before any await: the next routing decision already counts it
        try:
            job.endpoint = await self._resolve()
            async with self._joining:  # a few photos at a time: a burst of visitors would pile up copies
                body = _join_body(job.endpoint.fn_index, job.session, photo, category, gender)
                job.event_id = await self._join(job.endpoint, body, headers, job.session)
                del body
        except BaseException:
            del self.jobs[job.session]
            raise
        self.mark_up()
        return job

    async def follow(self, job: _Job) -> AsyncIterator[Update]:
        """The job's updates; closing this early cancels the job. Raises `_StreamBroke` if the stream ends first."""
        finished = False
        try:
            async for update in self._stream(job):
                finished = isinstance(update, Finished)
                yield update
        finally:
            del self.jobs[job.session]
            if finished:
                self._completed(time.monotonic())
            else:  # the visitor left, pressed Stop, or the stream broke
                self._cancel_soon(job.endpoint, job.session, job.event_id)

    def _completed(self, now: float) -> None:
        self.finished += 1
        if self._last_completion is not None:  # busy since the last one: the gap is one job's share of its time
            self._gaps.append(now - self._last_completion)
        self._last_completion = now if self.jobs else None

    @property
    def interval(self) -> float | None:
        """The mean time between two completions while busy (a mean: completions are read in bursts), or None."""
        return sum(self._gaps) / len(self._gaps) if self._gaps else None

    def mark_down(self, reason: str) -> None:
        """Skip this backend for new jobs, and probe it in the background (backing off) until it answers."""
        self._endpoint = None
        if self.down:  # the probe counts its own failures; many jobs reporting one outage are one failure
            return
        self.down, self._failures = True, self._failures + 1
        logger.warning(
            "%s is down (%s); it is tried again in %.0f s.", self.name.capitalize(), reason, self._retry_s()
        )
        if not self._probing:
            self._probing = True
            self._spawn(self._probe())

    def _retry_s(self) -> float:
        return min(RETRY_DOWN_MAX_S, self.retry_after * 2 ** max(0, self._failures - 1))

    def mark_up(self) -> None:
        if self.down:
            logger.info("%s answers again.", self.name.capitalize())
        self.down, self._failures = False, 0

    async def _probe(self) -> None:
        try:
            while self.down:
                await asyncio.sleep(self._retry_s())
                if not self.down:
                    return
                try:
                    endpoint = await self._resolve()
                    self._checked(await self.http.get(f"{endpoint.url}gradio_api/queue/status"), "status")
                except (_NotReady, RelayError, httpx.HTTPError):
                    self._failures += 1
                    self._endpoint = None
                    continue
                self.mark_up()
        finally:
            self._probing = False

    async def _resolve(self) -> _Endpoint:
        """The backend's endpoint, looked up once for all callers: concurrent ones share the lookup under way, and
        a failed lookup's answer stands for RETRY_EVERY_S, so many waiting visitors make one Hub call, not one each.
        """
        if self._endpoint is not None:
            return self._endpoint
        if self._lookup is None or (self._lookup.done() and time.monotonic() >= self._lookup_again_at):
            self._lookup = asyncio.get_running_loop().create_task(self._look_up())
            self._lookup.add_done_callback(self._looked_up)
        return await asyncio.shield(self._lookup)  # a caller that leaves does not cancel the others' lookup

    def _looked_up(self, lookup: asyncio.Task[_Endpoint]) -> None:
        failed = lookup.cancelled() or lookup.exception() is not None  # retrieved here: no "never retrieved" noise
        self._lookup_again_at = time.monotonic() + (RETRY_EVERY_S if failed else 0.0)

    async def _look_up(self) -> _Endpoint:
        url = self.target if self.target.startswith(("http://", "https://")) else await self._space_url()
        url = url.rstrip("/") + "/"
        try:
            response = await self.http.get(f"{url}config")
        except httpx.HTTPError as error:
            raise _NotReady(type(error).__name__) from None
        config = self._checked(response, "config").json()
        indices = [dep["id"] for dep in config.get("dependencies", []) if dep.get("api_name") == API_NAME]
        if not indices:
            logger.error("%s has no %s endpoint.", self.name.capitalize(), API_NAME)
            raise _Fault(UNAVAILABLE, f"no {API_NAME} endpoint")
        self._endpoint = _Endpoint(url, indices[0])
        return self._endpoint

    async def _space_url(self) -> str:
        try:
            info = await asyncio.to_thread(HfApi().space_info, self.target, token=self._token or False)
        except Exception as error:
            raise _NotReady(type(error).__name__) from None
        stage = getattr(info.runtime, "stage", None)
        stage = str(getattr(stage, "value", stage) or "UNKNOWN")
        if stage in WAKING_STAGES:
            if info.host and (self._waking is None or self._waking.done()):  # one wake request at a time
                self._waking = self._spawn(self._wake(info.host))
            raise _NotReady(f"stage {stage}")
        if stage != "RUNNING" or not info.host:
            logger.error("%s cannot serve (stage %s).", self.name.capitalize(), stage)
            raise _Fault(UNAVAILABLE, f"stage {stage}")
        return info.host

    async def _wake(self, host: str) -> None:
        """A request to a sleeping Space wakes it; its answer does not matter."""
        with contextlib.suppress(httpx.HTTPError):
            await self.http.get(host, timeout=30.0)

    async def current_build(self) -> str | None:
        """The build id this backend says it has now, asked with a GET that runs nothing; None if it cannot say."""
        try:
            endpoint = await self._resolve()
            response = await self.http.get(f"{endpoint.url}gradio_api/queue/status", timeout=5.0)
            return self._checked(response, "status").headers.get(BUILD_HEADER)
        except (_NotReady, RelayError, httpx.HTTPError):
            return None

    def _checked(self, response: httpx.Response, what: str) -> httpx.Response:
        if response.status_code in (401, 403):
            logger.error(
                "%s refused our %s request (HTTP %d): check HF_TOKEN.",
                self.name.capitalize(),
                what,
                response.status_code,
            )
            raise _Fault(UNAVAILABLE, f"HTTP {response.status_code}")
        if response.status_code in (404, 429) or response.status_code >= 500:
            raise _NotReady(f"HTTP {response.status_code}")
        if response.is_error:
            logger.error(
                "%s answered our %s request with HTTP %d.", self.name.capitalize(), what, response.status_code
            )
            raise _Fault(FAILED, f"HTTP {response.status_code}")
        return response

    async def _join(self, endpoint: _Endpoint, body: bytes, headers: dict[str, str], session: str) -> str:
        url = f"{endpoint.url}gradio_api/queue/join"
        headers = {**headers, "content-type": "application/json"}
        post = asyncio.ensure_future(self.http.post(url, content=body, headers=headers))
        try:
            response = await asyncio.shield(post)
        except asyncio.CancelledError:  # cancelled mid-join: the job may be queued already, so cancel it once known
            post.add_done_callback(lambda done: self._cancel_joined(done, endpoint, session))
            raise
        except httpx.HTTPError as error:
            raise _NotReady(type(error).__name__) from None
        if response.status_code == 503 and "queue is full" in response.text.lower():
            raise RelayError(BUSY)
        if response.status_code == 422:  # the backend's own validator sentence
            raise RelayError(str(response.json().get("detail", FAILED)))
        return self._checked(response, "queue").json()["event_id"]

    async def _stream(self, job: _Job) -> AsyncIterator[Update]:
        url = f"{job.endpoint.url}gradio_api/queue/data"
        try:
            async with self.http.stream("GET", url, params={"session_hash": job.session}) as response:
                build = response.headers.get(BUILD_HEADER)
                async for line in _lines(response):
                    if not line.startswith(b"data:"):
                        continue
                    message = json.loads(line[5:])
                    if message.get("event_id") not in (None, job.event_id):
                        continue
                    if message.get("msg") == "unexpected_error":  # the backend is stopping, or lost our session
                        break
                    self._note(job, message)
                    update = _update(message)
                    if isinstance(update, Finished):
                        update = dataclasses.replace(update, build=build)
                    if update is not None:
                        yield update
                        if isinstance(update, Finished):
                            return
        except httpx.HTTPError as error:
            logger.warning("The stream from %s broke (%s).", self.name, type(error).__name__)
        self._endpoint = None
        raise _StreamBroke  # the pool resends a job that had not started, or says LOST

    def _note(self, job: _Job, message: dict) -> None:
        """Keep what the backend announces about this job: its expected finish while it waits, its start, and the
        time it announces at the start (the GPU gate's estimate for a job starting now) as its finish from then."""
        kind, now = message.get("msg"), time.monotonic()
        if kind == "estimation" and message.get("rank_eta") is not None:
            job.due = now + message["rank_eta"]
        elif kind == "process_starts":
            job.started, job.due = now, None
            if message.get("eta"):
                self.service = float(message["eta"])
                job.due = now + self.service

    def _cancel_joined(self, post: asyncio.Future[httpx.Response], endpoint: _Endpoint, session: str) -> None:
        if not post.cancelled() and post.exception() is None and post.result().status_code == 200:
            self._cancel_soon(endpoint, session, post.result().json()["event_id"])

    def _cancel_soon(self, endpoint: _Endpoint | None, session: str, event_id: str | None) -> None:
        """Cancel in a task of its own: the caller may itself be a task being cancelled."""
        if endpoint is None or event_id is None:
            return
        body = {"session_hash": session, "fn_index": endpoint.fn_index, "event_id": event_id}

        async def cancel() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.post(f"{endpoint.url}gradio_api/cancel", json=body, timeout=5.0)

        self._spawn(cancel())

    def _spawn(self, work: object) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _lines(response: httpx.Response) -> AsyncIterator[bytes]:
    """The stream's lines, undecoded: `aiter_lines` decodes and joins a long line (a result's pictures, about a
    megabyte) again at every chunk, a tenth of the front's CPU; `json.loads` takes the bytes as they are."""
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        buffer += chunk
        if b"\n" in chunk:
            *lines, rest = buffer.split(b"\n")
            buffer = bytearray(rest)
            for line in lines:
                yield bytes(line.rstrip(b"\r"))
    if buffer:
        yield bytes(buffer)


def _join_body(fn_index: int, session: str, photo: bytes, category: str, gender: str) -> bytes:
    """The queue join's JSON, with the photo base64-encoded straight into it (base64 needs no JSON escaping).

    The usual way (str, then JSON str, then bytes) holds four copies of a megabyte-sized photo per visitor.
    """
    head = json.dumps({"fn_index": fn_index, "session_hash": session, "event_data": None})[:-1]
    tail = json.dumps([category, gender])[1:]
    return b"".join([head.encode(), b', "data": ["', base64.b64encode(photo), b'", ', tail.encode(), b"}"])


def _update(message: dict) -> Update | None:
    """Translate one queue message for our event into an update, or raise the backend's sentence."""
    kind = message.get("msg")
    if kind == "estimation":
        return Queued(rank=message.get("rank") or 0, eta=message.get("rank_eta"), received=time.monotonic())
    if kind == "process_starts":
        return Running(fraction=None, desc=None)
    if kind == "progress":
        units = message.get("progress_data") or [{}]
        return Running(fraction=units[-1].get("progress"), desc=units[-1].get("desc"))
    if kind == "process_completed":
        output = message.get("output") or {}
        data = output.get("data") or []
        if len(data) == 1 and isinstance(data[0], list):  # gr.api sends its tuple as one value
            data = data[0]
        if message.get("success") and len(data) == 4:
            return Finished(*data)
        raise RelayError(output.get("error") or FAILED)  # a gr.Error's sentence from the backend, as it is
    return None  # heartbeat, log, process_generating, close_stream
