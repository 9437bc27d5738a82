"""How often a visitor's status line is sent, and the front's own share of the wait it shows.

Each line sent is a Gradio generator step (postprocessing, a diff, an SSE message): the front's largest CPU cost
per request. The backend announces a new place to every waiting job each time a job starts (several times a
second with a fast GPU), so a waiting visitor's new place or wait is shown at the next tick, once a TICK_S, with
the countdown, and so is a job's start (its first words, "Waiting for the GPU" or its first step, follow within
moments); anything else (the first place, the job's progress, the result) is shown at once, and a
line that would only repeat the last one is not sent, but while the visitor waits in a queue.

The backend's ETA is for its own result; the visitor has theirs after the front's hop back (the pictures decoded,
saved, handed to Gradio and fetched). The front measures that share of each finished job (`Tail`) and adds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from relay import Queued, Restarting, Running, Update, Waking

TAIL_WEIGHT = 0.2  # the weight of the latest job in the mean of the front's own time per job


async def ticking(updates: AsyncIterator[Update], tick_s: float) -> AsyncIterator[Update | None]:
    """The backend's updates as they come, and None once every `tick_s` (to count down and check in)."""
    pending = asyncio.ensure_future(anext(updates))
    next_tick = time.monotonic() + tick_s
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=max(0.0, next_tick - time.monotonic()))
            if not done:
                next_tick = max(next_tick + tick_s, time.monotonic() + tick_s / 2)
                yield None
                continue
            try:
                update = pending.result()
            except StopAsyncIteration:
                return
            yield update
            pending = asyncio.ensure_future(anext(updates))
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):  # its outcome no longer matters; it must be over before aclose()
            await pending
        await updates.aclose()


class Pacer:
    """Decides which of a request's moments are sent to its visitor (see the module's docstring)."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.latest: Update | None = None
        self._sent_at = float("-inf")
        self._line: str | None = None

    def arrived(self, update: Update | None, now: float) -> bool:
        """Note a backend update (None: a tick); True when the status line should be sent now."""
        if update is None:
            due = now - self._sent_at >= self.tick_s / 2  # a line just sent needs no tick on top
        else:
            held = isinstance(update, Queued) and isinstance(self.latest, Queued)  # a new place: at the tick
            bare = isinstance(update, Running) and update.desc is None  # a start: its first words follow at once
            due = not (held or bare)
            self.latest = update
        if due:
            self._sent_at = now
        return due

    def repeats(self, line: str) -> bool:
        """True when `line` need not be sent: it is the line sent last, and no countdown or queue place hangs on
        it (a visitor who leaves the queue is noticed at the next line sent, so a waiting one gets one a tick)."""
        if line == self._line and not isinstance(self.latest, Queued | Waking | Restarting):
            return True
        self._line = line
        return False


class Tail:
    """The front's own time per job after the backend's result (a weighted mean of the latest jobs), in seconds."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._seen = False

    def add(self, seconds: float) -> None:
        self.seconds = seconds if not self._seen else (1 - TAIL_WEIGHT) * self.seconds + TAIL_WEIGHT * seconds
        self._seen = True
