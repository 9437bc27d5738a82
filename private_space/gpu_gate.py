"""The GPU gate: at most `gpus` jobs on the GPU at once, and queue ETAs that follow the GPU, not the slots.

The app lets Gradio's queue run two jobs per GPU (`slots`) so that the next photo is decoded and the last results
are encoded while the GPU works. Gradio estimates a waiting job's finish as `avg + rank·avg/slots + time until a
slot frees`, with `avg` the mean total time of past jobs: with two jobs per GPU that is wrong both ways (too
optimistic in a burst, too pessimistic for a lone visitor). The gate times each stage itself and stands in for
Gradio's per-function timer with the `avg` that makes the same formula right:
- while a slot is free, the job starts at once: decode + the GPU backlog ahead of it + GPU + finishing;
- while every slot is taken, jobs leave one per GPU time: `avg = slots × GPU time / gpus`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import statistics
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

WINDOW = 20  # jobs whose stage times make the estimate
T = TypeVar("T")


class GpuGate:
    def __init__(self, gpus: int) -> None:
        if gpus < 1:
            raise ValueError(f"GPU_CONCURRENCY must be 1 or more, not {gpus}.")
        self.gpus = gpus
        self.slots = 2 * gpus  # per GPU: one job on it, one being decoded or finished
        self._guard = asyncio.BoundedSemaphore(gpus)
        self._workers = ThreadPoolExecutor(gpus, thread_name_prefix="gpu")
        self._times: dict[str, deque[float]] = {stage: deque(maxlen=WINDOW) for stage in ("decode", "gpu", "finish")}
        self._ahead: dict[object, float | None] = {}  # jobs waiting for (None) or on (start time) a GPU
        self._slots_full = lambda: False

    async def run(self, work: Callable[[], T], *, waiting: Callable[[], object]) -> T:
        """Run `work` on a GPU when one is free (calling `waiting` first if none is), timed.

        A job cancelled while it waits never runs. One cancelled while it runs keeps its GPU until `work` returns,
        as a thread cannot be stopped: the next job never runs beside it.
        """
        loop, key = asyncio.get_running_loop(), object()
        self._ahead[key] = None
        try:
            if self._guard.locked():
                waiting()
            await self._guard.acquire()
        except BaseException:
            del self._ahead[key]
            raise
        started = self._ahead[key] = time.monotonic()

        def leave(done: Future[T]) -> None:  # in the worker thread, once `work` is really over
            ran = not done.cancelled() and done.exception() is None  # only real runs time the GPU
            with contextlib.suppress(RuntimeError):  # the server is shutting down
                loop.call_soon_threadsafe(self._release, key, time.monotonic() - started if ran else None)

        future = self._workers.submit(contextvars.copy_context().run, work)  # gr.Progress finds its job there
        future.add_done_callback(leave)
        return await asyncio.wrap_future(future)

    def _release(self, key: object, seconds: float | None) -> None:
        del self._ahead[key]
        if seconds is not None:
            self._times["gpu"].append(seconds)
        self._guard.release()

    def record(self, *, decode: float, finish: float) -> None:
        """The CPU stages of a finished job: decoding before its GPU turn, compositing and encoding after.

        Like everything here but `work`, called on the server's event loop.
        """
        self._times["decode"].append(decode)
        self._times["finish"].append(finish)

    def install(self, queue: Any, fn: Any) -> None:
        """Stand in for Gradio's timer of `fn` (a BlockFunction) in `queue` (the Blocks' gradio Queue).

        Called after each job: Gradio gives no ETA before one run has finished, and neither does the gate.
        """
        if queue.process_time_per_fn.get(fn) is not self:
            self._slots_full = lambda: _slots_full(queue, fn)
            queue.process_time_per_fn[fn] = self

    def add(self, duration: float) -> None:
        """Gradio reports each job's total time here; the stage times above say more."""

    @property
    def avg_time(self) -> float:
        decode, gpu, finish = (statistics.fmean(t) if t else 0.0 for t in self._times.values())
        if self._slots_full():
            return self.slots * gpu / self.gpus
        return decode + max(0.0, self._backlog(gpu) - decode) + gpu + finish

    def _backlog(self, gpu: float) -> float:
        """Seconds until a GPU is free for a job that asks now."""
        now = time.monotonic()
        work = sum(gpu if started is None else max(0.0, gpu - (now - started)) for started in self._ahead.values())
        return work / self.gpus


def _slots_full(queue: Any, fn: Any) -> bool:
    event_queue = queue.event_queue_per_concurrency_id.get(fn.concurrency_id)
    return event_queue is not None and event_queue.current_concurrency >= (event_queue.concurrency_limit or 0)
