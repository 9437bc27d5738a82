"""A stand-in for the private Space's models with a fixed service time, for tests and the benchmark.

It goes into the real app through `create_app(pipeline=...)`: the same queue, guard and encoding as production,
with the GPU work replaced by a sleep. It records when each job was inside it, to check that none overlap.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from PIL import Image

CLASS_NAMES = ["Background", "Hat", "Hair", "Face", "Upper-clothes"]


class StandInPipeline:
    def __init__(self, service_time: float = 0.0, steps: int = 2) -> None:
        self.service_time = service_time
        self.steps = steps
        self.intervals: list[tuple[float, float]] = []
        self.prompts: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.inside = 0
        self.max_inside = 0
        self._lock = threading.Lock()

    @property
    def class_names(self) -> list[str]:
        return CLASS_NAMES

    def render(
        self, photo: Image.Image, prompt: str, seed: int, progress: Any = None
    ) -> tuple[np.ndarray, Image.Image]:
        with self._lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            self.prompts.append(prompt)
            self.sizes.append(photo.size)
        started = time.monotonic()
        try:
            for step in range(self.steps):
                if progress is not None:
                    progress(
                        (step + 1) / self.steps * 0.9, desc=f"Painting the backdrop (step {step + 1} of {self.steps})"
                    )
                time.sleep(self.service_time / self.steps)
        finally:
            with self._lock:
                self.inside -= 1
                self.intervals.append((started, time.monotonic()))
        class_map = np.zeros((photo.height, photo.width), dtype=np.uint8)
        class_map[photo.height // 4 : photo.height * 3 // 4, photo.width // 4 : photo.width * 3 // 4] = 4
        rng = np.random.default_rng(seed)
        background = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
        return class_map, background
