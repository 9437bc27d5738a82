"""The pool of backends the public app speaks to, one or several: each job goes where it should finish first.

Judged from what each backend announced to the jobs this relay sent it (when each should finish) and how fast it
has been finishing them (backends.py). A backend that fails to take a job is skipped and probed in the background
until it answers again. A job outlives its backend: when a backend goes away (a redeploy, a crash), each job it
had, waiting or running, is sent again, to another backend that is up or to the same one once it is back
(at-least-once delivery), in the order the jobs first came (`Line`), within the wake timeout; a job that was running
on a backend that went away twice is not sent a third time (`RepeatCrash`), so one photo that stops backends cannot
stop them all in turn.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import relay
from backends import RETRY_EVERY_S, Backend, SentJob
from relay import (
    Busy,
    Fault,
    Lost,
    NotReady,
    RepeatCrash,
    Restarting,
    Running,
    StreamBroke,
    Unavailable,
    Update,
    Waking,
)

logger = logging.getLogger("backdrop.relay")  # the same logger as relay.py: all the relay's log lines under one name

CRASHES_AT_MOST = 2  # a job that was running on a backend that went away this many times is not sent again


class Photo(Protocol):
    """A job's photo, read again for each time the job is sent (photos.Photo)."""

    async def bytes(self) -> bytes: ...


@dataclass
class PhotoJob:
    """One visitor's job as the pool sends it: what to send, their own headers (their ZeroGPU token), and when it
    first came (its place among jobs waiting for a backend)."""

    photo: Photo
    category: str
    gender: str
    headers: dict[str, str]
    since: float = field(default_factory=time.monotonic)


class Line:
    """The jobs no backend took when they asked (every backend down, asleep or restarting), oldest first.

    Only the first in line asks again, every RETRY_EVERY_S; once a backend takes it, the next asks at once. So the
    jobs a restart sends back keep the order they first came in, and a job that comes meanwhile goes after them.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[float, int, asyncio.Event]] = []  # (since, tie-break, its turn)
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    @contextlib.contextmanager
    def place(self, since: float) -> Iterator[asyncio.Event]:
        """A place in line for a job that came at `since`, for the length of the block: the event is set while the
        job is first in line."""
        entry = (since, next(self._numbers), asyncio.Event())
        bisect.insort(self._waiting, entry, key=lambda waiting: waiting[:2])
        self._turn()
        try:
            yield entry[2]
        finally:
            self._waiting.remove(entry)
            self._turn()

    def _turn(self) -> None:
        for number, (*_, turn) in enumerate(self._waiting):
            turn.set() if number == 0 else turn.clear()


class Placed(NamedTuple):
    """A job a backend took."""

    backend: Backend
    job: SentJob


@dataclass
class Resends:
    """Jobs sent again because their backend went away: while they waited, or while they ran."""

    waiting: int = 0
    running: int = 0


class Backends:
    """One or several backends behind one `predict`: the only type the app speaks to.

    Down backends are skipped while another is up; when all are down, each is tried every RETRY_EVERY_S by the
    first job in line (the visitor sees Waking, or Restarting for a job sent before) until the longest wake
    timeout. A job whose backend went away is sent again (see the module's docstring).
    """

    def __init__(self, backends: Sequence[Backend]) -> None:
        if not backends:
            raise ValueError("no backends")
        self.backends = list(backends)
        self.wake_timeout = max(backend.wake_timeout for backend in self.backends)
        self.line = Line()
        self.resends = Resends()
        for number, backend in enumerate(self.backends, start=1):
            backend.label = f"backend {number} of {len(self.backends)}"

    @classmethod
    def connect(cls, targets: Sequence[str], token: str | None, **settings: float) -> Backends:
        """One `Backend` per target (Space id or URL), all with the same token and settings."""
        count = len(targets)
        names = [f"backend {i} of {count}" if count > 1 else "the backend" for i in range(1, count + 1)]
        return cls(
            [Backend(target, token, name=name, **settings) for target, name in zip(targets, names, strict=True)]
        )

    def ranked(self, now: float) -> list[Backend]:
        """The backends to try, best first: the up ones (all when none is up), by expected finish, then load."""
        candidates = [backend for backend in self.backends if not backend.down] or self.backends
        known = [backend.figures.gap for backend in self.backends if backend.figures.gap]
        default = min(known, default=1.0)  # a backend with no figures yet counts as the fastest known: it gets tried

        def key(indexed: tuple[int, Backend]) -> tuple[float, int, int]:
            index, backend = indexed
            return round(backend.figures.expected_finish(now, default), 3), len(backend.figures.jobs), index

        return [backend for _, backend in sorted(enumerate(candidates), key=key)]

    async def predict(
        self, photo: Photo, category: str, gender: str, *, headers: dict[str, str] | None = None
    ) -> AsyncIterator[Update]:
        """Run one job on the best backend as its own session, and again wherever a backend takes it if that one
        goes away; closing this iterator early cancels that job only. `headers`: this visitor's own, for this job
        only (their ZeroGPU token)."""
        request, crashes, lost = PhotoJob(photo, category, gender, headers or {}), 0, None
        while True:
            placed = None if lost or len(self.line) else await self._place(request)
            if placed is None:
                async for update in self._wait_in_line(request, lost):
                    if isinstance(update, Placed):
                        placed = update
                    else:
                        yield update
            backend, job = placed
            running = False
            try:
                async with contextlib.aclosing(backend.follow(job)) as stream:
                    async for update in stream:
                        running = running or (isinstance(update, Running) and bool(update.fraction))
                        yield update
                return
            except StreamBroke:
                backend.mark_down("its stream broke", restarting=True)
            backend.moved += 1
            crashes += running
            if crashes >= CRASHES_AT_MOST:
                logger.warning("A job was running on backends that went away %d times: it is not sent again.", crashes)
                raise RepeatCrash from None
            lost = "running" if running else "waiting"
            if running:
                self.resends.running += 1
            else:
                self.resends.waiting += 1
            logger.warning("%s went away with a job %s there: it is sent again.", backend.name.capitalize(), lost)

    async def _wait_in_line(self, request: PhotoJob, lost: str | None) -> AsyncIterator[Update | Placed]:
        """Wait in `line` until a backend takes the job (yielded last, as Placed), telling the visitor how things
        stand meanwhile; Unavailable (or Lost, for a job that was running when it was lost) past the wake timeout."""
        deadline = time.monotonic() + self.wake_timeout
        with self.line.place(request.since) as first:
            while True:
                yield Restarting(self._back_in(), time.monotonic()) if lost else Waking()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first.wait(), timeout=max(0.0, deadline - time.monotonic()))
                if first.is_set() and (placed := await self._place(request)) is not None:
                    yield placed
                    return
                if time.monotonic() > deadline:
                    logger.error("No backend became reachable within %.0f s.", self.wake_timeout)
                    raise Lost if lost == "running" else Unavailable(relay.UNAVAILABLE)
                if first.is_set():
                    await asyncio.sleep(RETRY_EVERY_S)

    def _back_in(self) -> float | None:
        """Seconds until the first down backend should be back, judged by past outages; None if none is known."""
        now = time.monotonic()
        known = [back_in for backend in self.backends if (back_in := backend.back_in(now)) is not None]
        return min(known, default=None)

    async def _place(self, request: PhotoJob) -> Placed | None:
        """Join the best backend that takes the job; None when none did but one may soon (worth another try later).

        A backend that is not ready or at fault is marked down and the job goes to the next best one. The visitor
        gets a fault's sentence only once every backend is at fault, and the backend's own refusal of the input
        (its validator's sentence, the same on every backend) at once. The photo is read for this try only.
        """
        busy, faults, photo = False, [], await request.photo.bytes()
        for backend in self.ranked(time.monotonic()):
            try:
                return Placed(backend, await backend.accept(photo, request.category, request.gender, request.headers))
            except NotReady as reason:
                backend.mark_down(str(reason))
            except Fault as fault:  # skip it, probe it later
                backend.mark_down(fault.reason)
                faults.append(fault)
            except Busy:  # its queue is full: another may have room
                busy = True
        if busy:
            raise Busy
        if len(faults) == len(self.backends):
            raise Unavailable(str(faults[0]))
        return None
