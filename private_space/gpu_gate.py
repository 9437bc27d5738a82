"""The GPU gate: at most `gpus` jobs on the GPU at once, and queue ETAs that follow the GPU, not the slots.

The app lets Gradio's queue run two jobs per GPU (`slots`) so that the next photo is decoded and the last results
are encoded while the GPU works. Gradio's own estimate, `avg + rank·avg/slots + time until a slot frees` with `avg`
the mean total time of past jobs, is wrong both ways with two jobs per GPU, and no single `avg` makes it right:
with `avg = slots × GPU time` (right for the rank term) the "until a slot frees" term counts the same jobs a
second time, and a burst of four callers was told 42 % too long. So the gate times each stage of every job itself
(decode, GPU, finish), knows which stage each job in a slot is at, and gives Gradio's queue its estimates: it
replays the next jobs on the GPUs (FIFO, each after its slot frees and its photo is decoded) and tells each
waiting job when it should finish. Gradio gives no ETA before one run has finished, and neither does the gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import heapq
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gradio.server_messages import EstimationMessage

WINDOW = 20  # jobs whose stage times make the estimate
T = TypeVar("T")


@dataclass
class _Stages:
    """When one job holding a slot entered each stage: decoding (`gpu_from` None), waiting for or on a GPU, then
    finishing."""

    entered: float
    gpu_from: float | None = None  # when it asked for a GPU
    on_gpu: float | None = None  # when it got one
    finishing: float | None = None  # when its GPU work was over
    abandoned: bool = False  # it ended while its GPU work runs on


class GpuGate:
    def __init__(self, gpus: int) -> None:
        if gpus < 1:
            raise ValueError(f"GPU_CONCURRENCY must be 1 or more, not {gpus}.")
        self.gpus = gpus
        self.slots = 2 * gpus  # per GPU: one job on it, one being decoded or finished
        self._guard = asyncio.BoundedSemaphore(gpus)
        self._workers = ThreadPoolExecutor(gpus, thread_name_prefix="gpu")
        self._times: dict[str, deque[float]] = {stage: deque(maxlen=WINDOW) for stage in ("decode", "gpu", "finish")}
        self._jobs: list[_Stages] = []  # in the order they came; a cancelled one stays until its GPU work is over
        self._slots_taken: Callable[[], int] = lambda: len(self._jobs)

    @contextlib.asynccontextmanager
    async def job(self) -> AsyncIterator[Slot]:
        """One job's time in its slot: decode, then `Slot.run` on a GPU, then finish. A job that ends without an
        error times its decode and finish stages."""
        job = _Stages(entered=time.monotonic())
        self._jobs.append(job)
        ok = False
        try:
            yield Slot(self, job)
            ok = True
        finally:
            if job.on_gpu is None or job.finishing is not None:
                self._jobs.remove(job)
            else:  # cancelled while its thread runs on: it keeps its GPU, and `_release` removes it
                job.abandoned = True
            if ok and job.gpu_from is not None and job.finishing is not None:
                self._times["decode"].append(job.gpu_from - job.entered)
                self._times["finish"].append(time.monotonic() - job.finishing)

    async def _run(self, job: _Stages, work: Callable[[], T], waiting: Callable[[], object]) -> T:
        loop = asyncio.get_running_loop()
        job.gpu_from = time.monotonic()
        if self._guard.locked():
            waiting()
        await self._guard.acquire()
        job.on_gpu = time.monotonic()

        def leave(done: Future[T]) -> None:  # in the worker thread, once `work` is really over
            ran = not done.cancelled() and done.exception() is None  # only real runs time the GPU
            with contextlib.suppress(RuntimeError):  # the server is shutting down
                loop.call_soon_threadsafe(self._release, job, ran)

        future = self._workers.submit(contextvars.copy_context().run, work)  # gr.Progress finds its job there
        future.add_done_callback(leave)  # before wrap_future's: `_release` runs before this coroutine resumes
        return await asyncio.wrap_future(future)

    def _release(self, job: _Stages, ran: bool) -> None:
        job.finishing = time.monotonic()
        if ran:
            self._times["gpu"].append(job.finishing - job.on_gpu)
        if job.abandoned:
            self._jobs.remove(job)
        self._guard.release()

    def install(self, queue: Any, fn: Any) -> None:
        """Once, when the app is built: give Gradio's queue (`Blocks._queue`) the estimates for `fn` (a
        BlockFunction): its waiting jobs' ETAs, and the time a job starting now should take (`avg_time`)."""
        event_queue = lambda: queue.event_queue_per_concurrency_id.get(fn.concurrency_id)  # noqa: E731
        self._slots_taken = lambda: max(len(self._jobs), getattr(event_queue(), "current_concurrency", 0))
        queue.process_time_per_fn[fn] = self  # Gradio reads `avg_time` when a job starts and calls `add` at its end
        broadcast = queue.broadcast_estimations

        def broadcast_estimations(concurrency_id: str, after: int | None = None) -> None:
            if concurrency_id != fn.concurrency_id:
                broadcast(concurrency_id, after)
                return
            waiting = list(event_queue().queue)
            etas = self.etas(len(waiting))
            for rank, event in enumerate(waiting):
                if after is None or rank >= after:
                    eta = None if etas is None else etas[rank]
                    queue.send_message(event, EstimationMessage(rank=rank, rank_eta=eta, queue_size=len(waiting)))

        queue.broadcast_estimations = broadcast_estimations

    def add(self, duration: float) -> None:
        """Gradio reports each job's total time here; the stage times above say more."""

    @property
    def avg_time(self) -> float | None:
        """Seconds until a job that got its slot just now should finish (Gradio's `process_starts` ETA)."""
        etas = self.etas(0, starting=True)
        return None if etas is None else etas[0]

    def etas(self, waiting: int, *, starting: bool = False) -> list[float] | None:
        """Seconds from now until each of `waiting` queued jobs should finish (with `starting`, the job that just
        took its slot first); None until one job has run.

        Replays the jobs on the GPUs: those in slots (decoding, waiting, on a GPU) in the order they came, then the
        queue, each queued job taking the first slot to free (a job frees it `finish` after its GPU time).
        """
        if not self._times["gpu"]:
            return None
        decode, gpu, finish = (statistics.fmean(t) if t else 0.0 for t in self._times.values())
        now = time.monotonic()
        gpus: list[float] = []  # when each GPU is free
        frees: list[float] = []  # when each taken slot frees
        ready: list[float] = []  # jobs in slots that still need a GPU: when each can have one
        for job in self._jobs:
            if job.finishing is not None:
                frees.append(now + max(0.0, finish - (now - job.finishing)))
            elif job.on_gpu is not None:
                gpus.append(now + max(0.0, gpu - (now - job.on_gpu)))
                frees.append(gpus[-1] + finish)
            else:
                ready.append(now if job.gpu_from is not None else now + max(0.0, decode - (now - job.entered)))
        taken = self._slots_taken()
        unseen = max(0, taken - len(self._jobs))  # Gradio gave them a slot; they have not come in yet
        ready += [now + decode] * max(0, unseen - starting)
        gpus += [now] * max(0, self.gpus - len(gpus))
        heapq.heapify(gpus)
        heapq.heapify(frees)

        def run(at: float) -> float:
            """Run a job that can have a GPU from `at` on the first one free: when it finishes."""
            done = max(at, heapq.heappop(gpus)) + gpu
            heapq.heappush(gpus, done)
            heapq.heappush(frees, done + finish)
            return done + finish

        for at in sorted(ready):
            run(at)
        finishes = [run(now + decode)] if starting else []
        free_slots = max(0, self.slots - taken)
        for _ in range(waiting):
            if free_slots:
                free_slots, slot = free_slots - 1, now
            else:
                slot = heapq.heappop(frees)
            finishes.append(run(slot + decode))
        return [at - now for at in finishes]


class Slot:
    """A job's slot (`GpuGate.job`): where it takes its turn on a GPU."""

    def __init__(self, gate: GpuGate, stages: _Stages) -> None:
        self._gate, self._stages = gate, stages

    async def run(self, work: Callable[[], T], *, waiting: Callable[[], object]) -> T:
        """Run `work` on a GPU when one is free (calling `waiting` first if none is), timed.

        A job cancelled while it waits never runs. One cancelled while it runs keeps its GPU until `work` returns,
        as a thread cannot be stopped: the next job never runs beside it.
        """
        return await self._gate._run(self._stages, work, waiting)
