"""The public Space's link to the private one: Gradio's queue protocol, one backend session per visitor request.

Why not one shared `gradio_client.Client`: a Client is one session, and the backend cancels *every* job of a
session on `/cancel` and drops all its queued jobs when its stream closes, so one visitor's Stop would kill
another's job. A Client per request costs ~110 ms (new HTTP clients, SSL contexts, config and info fetches,
a 50 ms polling loop). Here every request gets a fresh session hash on one shared pool of keep-alive
connections: isolation for the price of one queue join and one event stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from huggingface_hub import HfApi

logger = logging.getLogger("backdrop.relay")

API_NAME = "predict_api"
WAKING_STAGES = {"SLEEPING", "STOPPED", "BUILDING", "APP_STARTING", "RUNNING_BUILDING", "RUNNING_APP_STARTING"}
RETRY_EVERY_S = 2.0
JOINS_AT_ONCE = 4

BUSY = "The service is busy, please try again in a minute."
UNAVAILABLE = "The image service is not reachable right now. Please try again in a few minutes."
LOST = "The image service stopped while working on your photo. Please try again."
FAILED = "Something went wrong while processing your photo. Please try again."


class RelayError(Exception):
    """A failure, worded for the visitor."""


class _NotReady(Exception):
    """The backend is asleep, starting or unreachable: worth another try until the wake deadline."""


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


Update = Waking | Queued | Running | Finished


@dataclass(frozen=True)
class _Endpoint:
    url: str  # the backend's root URL, ending in "/"
    fn_index: int


class Backend:
    """One private Space (an `owner/name` id or a URL) reached with one token over a shared connection pool."""

    def __init__(self, target: str, token: str | None, *, wake_timeout: float = 180.0) -> None:
        self.target = target
        self.wake_timeout = wake_timeout
        self._headers = {"x-hf-authorization": f"Bearer {token}"} if token else {}
        self._token = token
        self._endpoint: _Endpoint | None = None
        self._http: httpx.AsyncClient | None = None
        self._cancels: set[asyncio.Task[None]] = set()
        self._joining = asyncio.Semaphore(JOINS_AT_ONCE)

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:  # created on first use, inside the server's event loop
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            timeout = httpx.Timeout(10.0, read=60.0)  # the backend sends a heartbeat every 15 s
            self._http = httpx.AsyncClient(headers=self._headers, limits=limits, timeout=timeout)
        return self._http

    async def predict(
        self, photo: bytes, category: str, gender: str, *, ip_token: str | None = None
    ) -> AsyncIterator[Update]:
        """Run one job as its own backend session; closing this iterator early cancels that job, and only it."""
        session, event_id, endpoint = uuid.uuid4().hex, None, None
        headers = {"x-ip-token": ip_token} if ip_token else {}  # this visitor's ZeroGPU quota, this call only
        deadline = time.monotonic() + self.wake_timeout
        while event_id is None:
            try:
                endpoint = await self._resolve()
                async with self._joining:  # a few photos at a time: a burst of visitors would pile up copies
                    body = _join_body(endpoint.fn_index, session, photo, category, gender)
                    event_id = await self._join(endpoint, body, headers, session)
                    del body
            except _NotReady as reason:
                self._endpoint = None
                if time.monotonic() > deadline:
                    logger.error("The backend did not become reachable within %.0f s (%s).", self.wake_timeout, reason)
                    raise RelayError(UNAVAILABLE) from None
                yield Waking()
                await asyncio.sleep(RETRY_EVERY_S)
        del photo  # a visitor waiting in line keeps no photo in memory here
        finished = False
        try:
            async with contextlib.aclosing(self._stream(endpoint, session, event_id)) as stream:
                async for update in stream:
                    finished = isinstance(update, Finished)
                    yield update
        finally:
            if not finished:  # the visitor left, pressed Stop, or the stream broke
                self._cancel_soon(endpoint, session, event_id)

    async def _resolve(self) -> _Endpoint:
        if self._endpoint is None:
            url = self.target if self.target.startswith(("http://", "https://")) else await self._space_url()
            url = url.rstrip("/") + "/"
            try:
                response = await self.http.get(f"{url}config")
            except httpx.HTTPError as error:
                raise _NotReady(type(error).__name__) from None
            config = self._checked(response, "config").json()
            indices = [dep["id"] for dep in config.get("dependencies", []) if dep.get("api_name") == API_NAME]
            if not indices:
                logger.error("The backend has no %s endpoint.", API_NAME)
                raise RelayError(UNAVAILABLE)
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
            raise _NotReady(f"stage {stage}")
        if stage != "RUNNING" or not info.host:
            logger.error("The backend Space cannot serve (stage %s).", stage)
            raise RelayError(UNAVAILABLE)
        return info.host

    def _checked(self, response: httpx.Response, what: str) -> httpx.Response:
        if response.status_code in (401, 403):
            logger.error("The backend refused our %s request (HTTP %d): check HF_TOKEN.", what, response.status_code)
            raise RelayError(UNAVAILABLE)
        if response.status_code in (404, 429) or response.status_code >= 500:
            raise _NotReady(f"HTTP {response.status_code}")
        if response.is_error:
            logger.error("The backend answered our %s request with HTTP %d.", what, response.status_code)
            raise RelayError(FAILED)
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

    async def _stream(self, endpoint: _Endpoint, session: str, event_id: str) -> AsyncIterator[Update]:
        url = f"{endpoint.url}gradio_api/queue/data"
        try:
            async with self.http.stream("GET", url, params={"session_hash": session}) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    message = json.loads(line[5:])
                    if message.get("event_id") not in (None, event_id):
                        continue
                    update = _update(message)
                    if update is not None:
                        yield update
                        if isinstance(update, Finished):
                            return
        except httpx.HTTPError as error:
            logger.warning("The backend stream broke (%s).", type(error).__name__)
        self._endpoint = None
        raise RelayError(LOST)

    def _cancel_joined(self, post: asyncio.Future[httpx.Response], endpoint: _Endpoint, session: str) -> None:
        if not post.cancelled() and post.exception() is None and post.result().status_code == 200:
            self._cancel_soon(endpoint, session, post.result().json()["event_id"])

    def _cancel_soon(self, endpoint: _Endpoint, session: str, event_id: str) -> None:
        """Cancel in a task of its own: the caller may itself be a task being cancelled."""
        body = {"session_hash": session, "fn_index": endpoint.fn_index, "event_id": event_id}

        async def cancel() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.post(f"{endpoint.url}gradio_api/cancel", json=body, timeout=5.0)

        task = asyncio.get_running_loop().create_task(cancel())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)


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
    if kind == "unexpected_error":
        raise RelayError(LOST)
    return None  # heartbeat, log, process_generating, close_stream
