"""The public Space's link to a private one: Gradio's queue protocol, one backend session per visitor request.

Why not one shared `gradio_client.Client`: a Client is one session, and the backend cancels *every* job of a
session on `/cancel` and drops all its queued jobs when its stream closes, so one visitor's Stop would kill
another's job. A Client per request costs ~110 ms (new HTTP clients, SSL contexts, config and info fetches,
a 50 ms polling loop). Here every request gets a fresh session hash on one shared pool of keep-alive
connections: isolation for the price of one queue join and one event stream.

This module is the protocol alone, and holds no state: each function is one exchange with one backend, over the
HTTP client it is given. What the relay keeps about its backends (routing figures, health, the endpoint it
found) is the pool's, in backends.py. Each way a job can fail is an exception type of its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from huggingface_hub import HfApi

logger = logging.getLogger("backdrop.relay")

API_NAME = "predict_api"
WAKING_STAGES = {"SLEEPING", "STOPPED", "BUILDING", "APP_STARTING", "RUNNING_BUILDING", "RUNNING_APP_STARTING"}
BUILD_HEADER = "x-backdrop-build"  # the private app's build id, on each of its responses (private_space/identity.py)

BUSY = "The service is busy, please try again in a minute."
UNAVAILABLE = "The image service is not reachable right now. Please try again in a few minutes."
LOST = "The image service stopped while working on your photo. Please try again."
REPEAT_CRASH = (
    "The image service stopped twice while working on this photo, so it is not sent a third time. "
    "Please try another photo."
)
FAILED = "Something went wrong while processing your photo. Please try again."
ZERO_GPU = "ZeroGPU"  # the title of every refusal the `spaces` package raises for the platform ("ZeroGPU quota …")


class RelayError(Exception):
    """A failure, worded for the visitor; its type says which kind (the metrics count by type)."""


class Busy(RelayError):
    """The backend's queue is full."""

    def __init__(self) -> None:
        super().__init__(BUSY)


class InputRefused(RelayError):
    """The backend refused the input (its validator's sentence, the same on every backend)."""


class JobFailed(RelayError):
    """The backend ran the job and it failed (the backend's gr.Error sentence, as it is)."""


class Lost(RelayError):
    """The backend stopped while working on the job."""

    def __init__(self) -> None:
        super().__init__(LOST)


class RepeatCrash(RelayError):
    """The job was running on a backend that went away, twice: a photo that stops backends is not sent again."""

    def __init__(self) -> None:
        super().__init__(REPEAT_CRASH)


class GpuRefused(RelayError):
    """The platform refused the GPU for the job (ZeroGPU's quota, limit or queue), in ZeroGPU's own words."""


class Unavailable(RelayError):
    """No backend took the job: none became reachable in time, or every one is at fault."""


class Fault(RelayError):
    """The backend cannot take jobs: it refused our token, lacks the endpoint, or answered an unexpected error.

    Worded for the visitor, who sees it only when no backend takes the job.
    """

    def __init__(self, sentence: str, reason: str) -> None:
        super().__init__(sentence)
        self.reason = reason  # for the log line, without the address


class NotReady(Exception):
    """The backend is asleep, starting or unreachable: worth another try until the wake deadline.

    `wake`: the host of a sleeping Space, which a request wakes.
    """

    def __init__(self, reason: str, wake: str | None = None) -> None:
        super().__init__(reason)
        self.wake = wake


class StreamBroke(Exception):
    """The backend's event stream ended before the job's result: the backend stopped or the network broke."""


@dataclass(frozen=True)
class Waking:
    """The backend is asleep or starting."""


@dataclass(frozen=True)
class Restarting:
    """The backend that had the job went away; the job is sent again once a backend takes it. `back_in`: seconds
    until it should be back, as of `received` (None: no restart seen yet to judge by)."""

    back_in: float | None
    received: float


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
class Started(Running):
    """The job started; `eta` is the time the backend announced for it (seconds from `received`), if any."""

    eta: float | None = None
    received: float = 0.0


@dataclass(frozen=True)
class Finished:
    image_b64: str
    overlay_b64: str
    result_b64: str
    status: str
    build: str | None = None  # the build id of the backend that made it (its stream's BUILD_HEADER), if it said


Update = Waking | Restarting | Queued | Running | Finished


@dataclass(frozen=True)
class Endpoint:
    url: str  # the backend's root URL, ending in "/"
    fn_index: int


async def look_up(http: httpx.AsyncClient, target: str, token: str | None, name: str) -> Endpoint:
    """The backend's `predict_api` endpoint: from its URL, or from the Hub for a Space id (`name` is for logs)."""
    url = target if target.startswith(("http://", "https://")) else await space_host(target, token, name)
    url = url.rstrip("/") + "/"
    try:
        response = await http.get(f"{url}config")
    except httpx.HTTPError as error:
        raise NotReady(type(error).__name__) from None
    config = checked(response, "config", name).json()
    indices = [dep["id"] for dep in config.get("dependencies", []) if dep.get("api_name") == API_NAME]
    if not indices:
        logger.error("%s has no %s endpoint.", name.capitalize(), API_NAME)
        raise Fault(UNAVAILABLE, f"no {API_NAME} endpoint")
    return Endpoint(url, indices[0])


async def space_host(space: str, token: str | None, name: str) -> str:
    """A running Space's host; NotReady (with the host to wake) while it sleeps or starts."""
    try:
        info = await asyncio.to_thread(HfApi().space_info, space, token=token or False)
    except Exception as error:
        raise NotReady(type(error).__name__) from None
    stage = getattr(info.runtime, "stage", None)
    stage = str(getattr(stage, "value", stage) or "UNKNOWN")
    if stage in WAKING_STAGES:
        raise NotReady(f"stage {stage}", wake=info.host or None)
    if stage != "RUNNING" or not info.host:
        logger.error("%s cannot serve (stage %s).", name.capitalize(), stage)
        raise Fault(UNAVAILABLE, f"stage {stage}")
    return info.host


async def wake(http: httpx.AsyncClient, host: str) -> None:
    """A request to a sleeping Space wakes it; its answer does not matter."""
    with contextlib.suppress(httpx.HTTPError):
        await http.get(host, timeout=30.0)


async def status(http: httpx.AsyncClient, endpoint: Endpoint, name: str) -> str | None:
    """Whether the backend answers (its queue status, a GET that runs nothing): the build id it says it has now
    (None if it says none), or NotReady or Fault."""
    try:
        response = checked(await http.get(f"{endpoint.url}gradio_api/queue/status", timeout=5.0), "status", name)
    except httpx.HTTPError as error:
        raise NotReady(type(error).__name__) from None
    return response.headers.get(BUILD_HEADER)


def checked(response: httpx.Response, what: str, name: str) -> httpx.Response:
    if response.status_code in (401, 403):
        logger.error(
            "%s refused our %s request (HTTP %d): check HF_TOKEN.", name.capitalize(), what, response.status_code
        )
        raise Fault(UNAVAILABLE, f"HTTP {response.status_code}")
    if response.status_code in (404, 429) or response.status_code >= 500:
        raise NotReady(f"HTTP {response.status_code}")
    if response.is_error:
        logger.error("%s answered our %s request with HTTP %d.", name.capitalize(), what, response.status_code)
        raise Fault(FAILED, f"HTTP {response.status_code}")
    return response


async def join(
    http: httpx.AsyncClient,
    endpoint: Endpoint,
    body: bytes,
    headers: dict[str, str],
    name: str,
    *,
    joined_late: Callable[[str], None],
) -> str:
    """Join the backend's queue; the job's event id. Cancelled mid-join, `joined_late(event_id)` gets the id of a
    job that was queued all the same (to cancel it)."""
    headers = {**headers, "content-type": "application/json"}
    post = asyncio.ensure_future(http.post(f"{endpoint.url}gradio_api/queue/join", content=body, headers=headers))
    try:
        response = await asyncio.shield(post)
    except asyncio.CancelledError:
        post.add_done_callback(lambda done: _joined_late(done, joined_late))
        raise
    except httpx.HTTPError as error:
        raise NotReady(type(error).__name__) from None
    if response.status_code == 503 and "queue is full" in response.text.lower():
        raise Busy
    if response.status_code == 422:  # the backend's own validator sentence
        raise InputRefused(str(response.json().get("detail", FAILED)))
    return checked(response, "queue", name).json()["event_id"]


def _joined_late(post: asyncio.Future[httpx.Response], joined_late: Callable[[str], None]) -> None:
    if not post.cancelled() and post.exception() is None and post.result().status_code == 200:
        joined_late(post.result().json()["event_id"])


async def follow(
    http: httpx.AsyncClient, endpoint: Endpoint, session: str, event_id: str, name: str
) -> AsyncIterator[Update]:
    """The job's updates until it finishes; raises StreamBroke if the stream ends first (or the job's error)."""
    try:
        async with http.stream("GET", f"{endpoint.url}gradio_api/queue/data", params={"session_hash": session}) as r:
            build = r.headers.get(BUILD_HEADER)
            async for line in _lines(r):
                if not line.startswith(b"data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("event_id") not in (None, event_id):
                    continue
                if message.get("msg") == "unexpected_error":  # the backend is stopping, or lost our session
                    break
                update = update_of(message)
                if isinstance(update, Finished):
                    update = dataclasses.replace(update, build=build)
                if update is not None:
                    yield update
                    if isinstance(update, Finished):
                        return
    except httpx.HTTPError as error:
        logger.warning("The stream from %s broke (%s).", name, type(error).__name__)
    raise StreamBroke


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


async def cancel(http: httpx.AsyncClient, endpoint: Endpoint, session: str, event_id: str) -> None:
    body = {"session_hash": session, "fn_index": endpoint.fn_index, "event_id": event_id}
    with contextlib.suppress(httpx.HTTPError):
        await http.post(f"{endpoint.url}gradio_api/cancel", json=body, timeout=5.0)


def join_body(fn_index: int, session: str, photo: bytes, category: str, gender: str) -> bytes:
    """The queue join's JSON, with the photo base64-encoded straight into it (base64 needs no JSON escaping).

    The usual way (str, then JSON str, then bytes) holds four copies of a megabyte-sized photo per visitor.
    """
    head = json.dumps({"fn_index": fn_index, "session_hash": session, "event_data": None})[:-1]
    tail = json.dumps([category, gender])[1:]
    return b"".join([head.encode(), b', "data": ["', base64.b64encode(photo), b'", ', tail.encode(), b"}"])


def update_of(message: dict) -> Update | None:
    """Translate one queue message for our event into an update, or raise the backend's sentence (JobFailed)."""
    kind, now = message.get("msg"), time.monotonic()
    if kind == "estimation":
        return Queued(rank=message.get("rank") or 0, eta=message.get("rank_eta"), received=now)
    if kind == "process_starts":
        eta = message.get("eta")
        return Started(fraction=None, desc=None, eta=float(eta) if eta else None, received=now)
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
        if str(output.get("title") or "").startswith(ZERO_GPU):  # the platform's words for the visitor: no secret
            raise GpuRefused(output.get("error") or FAILED)
        raise JobFailed(output.get("error") or FAILED)  # a gr.Error's sentence from the backend, as it is
    return None  # heartbeat, log, process_generating, close_stream
