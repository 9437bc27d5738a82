"""A stand-in for the private Space's models with a fixed service time, for tests and the benchmark.

It goes into the real app through `create_app(pipeline=...)`: the same queue, guard and encoding as production,
with the GPU work replaced by a sleep. It records when each job was inside it, to check that none overlap.

Tests that need a job to stay running hold it with a latch instead of a long service time: after `hold()`, each
job that enters reports its first step, then waits until the test calls `release()` (one job each) or
`release_all()`; after `hold(every_step=True)` it waits so at each step. `wait_inside(n)` waits until `n` jobs are
inside. Nothing then depends on how fast the machine is. `release_everyone()` lets every held job of every
stand-in go on: the tests call it after each test, so a failing one never leaves a thread waiting.

A test that needs a job to fail calls `fail_next()`: the next job that enters raises `FailedOnPurpose` at once (as
the models raising would), and is neither held nor recorded among the jobs that ran (`intervals`). One that needs
ZeroGPU to refuse a job calls `refuse_gpu_next()`: the next job raises the `spaces` package's own error, as its GPU
call would on ZeroGPU, and is neither held nor recorded either.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any

import numpy as np
from PIL import Image

CLASS_NAMES = ["Background", "Hat", "Hair", "Face", "Upper-clothes"]
HELD_AT_MOST_S = 120.0  # a held job that is never released ends anyway, so a failing test cannot hang the server
_ALL: weakref.WeakSet[StandInPipeline] = weakref.WeakSet()


class FailedOnPurpose(RuntimeError):
    """A job the test asked to fail (`StandInPipeline.fail_next`)."""


class StandInPipeline:
    def __init__(self, service_time: float = 0.0, steps: int = 2) -> None:
        self.service_time = service_time
        self.steps = steps
        self.intervals: list[tuple[float, float]] = []
        self.prompts: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.inside = 0
        self.max_inside = 0
        self.entered = 0  # jobs that have entered render, ever
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._held = False
        self._every_step = False
        self._releases = threading.Semaphore(0)
        self._failing = 0  # jobs still to fail on purpose
        self._refusals: deque[Exception] = deque()  # ZeroGPU's errors for the next jobs, in order
        _ALL.add(self)

    @property
    def class_names(self) -> list[str]:
        return CLASS_NAMES

    @property
    def settings(self) -> dict[str, object]:
        """What decides its pictures (the private app's build id): a stand-in of other steps is another build."""
        return {"stand-in": True, "steps": self.steps}

    def hold(self, every_step: bool = False) -> None:
        """From now on, each job that enters reports its first step, then waits for a `release()` (at every step
        with `every_step`)."""
        if not self._held:  # permits left over from an earlier release_all() must not let the next jobs through
            self._releases = threading.Semaphore(0)
        self._every_step = every_step
        self._held = True

    def fail_next(self, jobs: int = 1) -> None:
        """The next `jobs` jobs that enter raise FailedOnPurpose at once."""
        with self._lock:
            self._failing += jobs

    def refuse_gpu_next(
        self,
        title: str = "ZeroGPU quota exceeded",
        message: str = "You have exceeded your free ZeroGPU quota (30s requested vs. 12s left). Try again in 0:14:02.",
        html: str | None = None,
    ) -> None:
        """The next job that enters raises what the `spaces` package raises when ZeroGPU refuses a GPU call: a
        gr.Error of this title and message, made by `spaces.zero.gradio.error`. With `html` (the message as HTML, as
        ZeroGPU writes its queue timeout) the error is its HTMLError and the message an HTMLString whose `str()` is
        `message`, as `spaces.zero.client` makes them."""
        from spaces.zero.client import html_string
        from spaces.zero.gradio import error

        refusal = error(title, html_string(html, message), html=True) if html else error(title, message)
        with self._lock:
            self._refusals.append(refusal)

    def release(self, jobs: int = 1) -> None:
        """Let `jobs` held jobs (present or future) go on."""
        for _ in range(jobs):
            self._releases.release()

    def release_all(self) -> None:
        """Stop holding: every job waiting goes on, and later ones are not held."""
        self._held = False
        self.release(64)

    @staticmethod
    def release_everyone() -> None:
        """`release_all()` on every stand-in there is."""
        for standin in list(_ALL):
            standin.release_all()

    def wait_inside(self, jobs: int, timeout: float = 60.0) -> None:
        """Wait until at least `jobs` jobs are inside render at once; AssertionError if that never happens."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.inside >= jobs, timeout=timeout):
                raise AssertionError(f"{jobs} job(s) never were inside the pipeline at once (now {self.inside})")

    def wait_entered(self, jobs: int, timeout: float = 60.0) -> None:
        """Wait until at least `jobs` jobs have entered render since the start; AssertionError if not in time."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.entered >= jobs, timeout=timeout):
                raise AssertionError(f"{jobs} job(s) never entered the pipeline (so far {self.entered})")

    def render(
        self, photo: Image.Image, prompt: str, seed: int, progress: Any = None
    ) -> tuple[np.ndarray, Image.Image]:
        with self._changed:
            if self._refusals:
                raise self._refusals.popleft()
            failing, self._failing = self._failing > 0, max(0, self._failing - 1)
        if failing:
            raise FailedOnPurpose("the test asked this job to fail")
        with self._changed:
            self.inside += 1
            self.entered += 1
            self.max_inside = max(self.max_inside, self.inside)
            self.prompts.append(prompt)
            self.sizes.append(photo.size)
            self._changed.notify_all()
        started = time.monotonic()
        try:
            for step in range(self.steps):
                if progress is not None:
                    progress(
                        (step + 1) / self.steps * 0.9, desc=f"Painting the backdrop (step {step + 1} of {self.steps})"
                    )
                if self._held and (step == 0 or self._every_step):
                    self._releases.acquire(timeout=HELD_AT_MOST_S)
                time.sleep(self.service_time / self.steps)  # read at each step: a test may shorten it mid-job
        finally:
            with self._changed:
                self.inside -= 1
                self.intervals.append((started, time.monotonic()))
                self._changed.notify_all()
        class_map = np.zeros((photo.height, photo.width), dtype=np.uint8)
        class_map[photo.height // 4 : photo.height * 3 // 4, photo.width // 4 : photo.width * 3 // 4] = 4
        rng = np.random.default_rng(seed)
        background = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
        return class_map, background
