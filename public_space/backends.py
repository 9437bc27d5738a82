"""Several backends behind one relay: each job goes to the backend where it is expected to finish first.

Judged from what each backend announced to the jobs this relay sent it (when each should finish) and how fast it
has been finishing them. A backend that fails to take a job is skipped and probed in the background until it
answers again; a job that had not started when its backend died is sent to another one. The protocol to one
backend is in relay.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

from relay import (
    BUSY,
    LOST,
    RETRY_EVERY_S,
    UNAVAILABLE,
    Backend,
    RelayError,
    Running,
    Update,
    Waking,
    _Fault,
    _Job,
    _NotReady,
    _StreamBroke,
)

logger = logging.getLogger("backdrop.relay")  # the same logger as relay.py: all the relay's log lines under one name


class Backends:
    """Several backends behind one `predict`: each job goes where it is expected to finish first.

    Down backends are skipped while another is up; when all are down, each is tried every RETRY_EVERY_S (the
    visitor sees Waking) until the longest wake timeout. A job whose backend's stream breaks before it started
    goes to another backend; one that had started gets the LOST sentence (it may have been partly processed).
    """

    def __init__(self, backends: Sequence[Backend]) -> None:
        if not backends:
            raise ValueError("no backends")
        self.backends = list(backends)
        self.wake_timeout = max(backend.wake_timeout for backend in self.backends)

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
        known = [backend.gap for backend in self.backends if backend.gap]
        default = min(known, default=1.0)  # a backend with no figures yet counts as the fastest known: it gets tried

        def key(indexed: tuple[int, Backend]) -> tuple[float, int, int]:
            index, backend = indexed
            return round(backend.expected_finish(now, default), 3), len(backend.jobs), index

        return [backend for _, backend in sorted(enumerate(candidates), key=key)]

    async def predict(
        self, photo: bytes, category: str, gender: str, *, ip_token: str | None = None
    ) -> AsyncIterator[Update]:
        """Run one job on the best backend as its own session; closing this iterator early cancels that job only."""
        headers = {"x-ip-token": ip_token} if ip_token else {}  # this visitor's ZeroGPU quota, this call only
        spare = photo if len(self.backends) > 1 else None  # kept to resend a job that had not started; else freed
        while True:
            deadline = time.monotonic() + self.wake_timeout
            while (placed := await self._place(photo, category, gender, headers)) is None:
                if time.monotonic() > deadline:
                    logger.error("No backend became reachable within %.0f s.", self.wake_timeout)
                    raise RelayError(UNAVAILABLE)
                yield Waking()
                await asyncio.sleep(RETRY_EVERY_S)
            del photo  # a visitor waiting in line keeps no photo here, unless another backend could take it over
            backend, job = placed
            try:
                async with contextlib.aclosing(backend.follow(job)) as stream:
                    async for update in stream:
                        if isinstance(update, Running) and update.fraction:
                            spare = None  # work on it began: it will not be sent again (before, it waits its turn)
                        yield update
                return
            except _StreamBroke:
                backend.mark_down("its stream broke")
                if spare is None:  # it had started (it may be partly processed), or there is no other backend
                    raise RelayError(LOST) from None
            logger.warning("A job that had not started on %s goes to another backend.", backend.name)
            photo = spare

    async def _place(
        self, photo: bytes, category: str, gender: str, headers: dict[str, str]
    ) -> tuple[Backend, _Job] | None:
        """Join the best backend that takes the job; None when none did but one may soon (worth another try later).

        A backend that is not ready or at fault is marked down and the job goes to the next best one. The visitor
        gets a fault's sentence only once every backend is at fault, and the backend's own refusal of the input
        (its validator's sentence, the same on every backend) at once.
        """
        busy, faults = False, []
        for backend in self.ranked(time.monotonic()):
            try:
                return backend, await backend.accept(photo, category, gender, headers)
            except _NotReady as reason:
                backend.mark_down(str(reason))
            except _Fault as fault:  # skip it, probe it later
                backend.mark_down(fault.reason)
                faults.append(fault)
            except RelayError as error:
                if str(error) != BUSY:  # the visitor's own input
                    raise
                busy = True  # its queue is full: another may have room
        if busy:
            raise RelayError(BUSY)
        if len(faults) == len(self.backends):
            raise RelayError(str(faults[0]))
        return None
