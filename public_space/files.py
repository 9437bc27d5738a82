"""What the front keeps on disk, and for how long. This module alone decides it (Gradio's own sweep stays off).

The front keeps two kinds of files in Gradio's cache folder: visitors' uploads, and the overlays and results it
made for them (each saved with `save_result`, so its path is known from the start).

- A file stays at least `keep_s` after its last use, and goes once it has been unused that long. Each run on an
  upload uses it (so a visitor can try another style without uploading again); each fetch of a result uses it
  (its download button, a gradio_client download).
- Only the visitor who uploaded a photo can run it. Gradio stores uploads by content (`<cache>/<sha256>/<name>`),
  so two visitors' uploads of one photo are one file: each visitor holds a claim of their own on it, renewed by
  their own runs, and the file goes when the last claim has lapsed.
- All kept files together stay within `quota_bytes`: past it, the least recently used go first, even within
  `keep_s` (a quota sized for the traffic makes that rare). A file in use never goes: an upload while a job runs
  on it, a result until its first fetch (at most `keep_s`). Only these can take the disk past the quota.
- One visitor's uploads together stay within `visitor_bytes`: an upload past that is refused with a sentence, so
  one client can neither fill the disk nor push other visitors' photos out. The page shows the upload's 429 and its
  sentence; gradio_client, which would show HTTP jargon, gets a path that is no one's, and the sentence at its run.

Gradio's records of its files (`Blocks.temp_file_sets`) lose each removed file too, or they would keep growing.
The middleware also serves the example photo, so that no page shows where it lies on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gradio.processing_utils import save_bytes_to_cache
from starlette.requests import Request

from guard import Message, Receive, Scope, Send
from visitors import Callers

UPLOAD = "/gradio_api/upload"
FILE = "/gradio_api/file="
EXAMPLE_ROUTE = "/examples/astronaut.png"
SWEEP_EVERY_S = 30.0  # at most; a shorter keep_s is swept more often

logger = logging.getLogger("backdrop")


def too_many_uploads(wait_s: float) -> str:
    wait = math.ceil(wait_s - 1e-6)  # 500.0000001 s (float sums on the clock) is 500 s
    return f"You have uploaded too many photos in the last few minutes. Please try again in {wait} s."


@dataclass
class _Kept:
    size: int
    used: float  # when it was last used (monotonic)
    claims: dict[str, float] = field(default_factory=dict)  # an upload's visitors -> when each last used it
    in_use: int = 0  # jobs running on an upload; 1 for a result not fetched yet


class Files:
    """This app's uploads and results in Gradio's cache folder: who may use each, and when each was last used."""

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        keep_s: float,
        quota_bytes: int,
        visitor_bytes: int,
        trusted_hops: int,
        gradio_sets: list[set[str]],
    ) -> None:
        """`trusted_hops` names an upload's visitor as the endpoint names it (visitors.py); `gradio_sets` is
        `Blocks.temp_file_sets` itself (the list, which Gradio extends as components are made)."""
        self.given_dir = str(cache_dir)  # Gradio's records name files under the folder as it was given ...
        self.cache_dir = Path(cache_dir).resolve()  # ... and these, under the folder itself
        self.keep_s = keep_s
        self.quota_bytes = quota_bytes
        self.visitor_bytes = visitor_bytes
        self.trusted_hops = trusted_hops
        self.gradio_sets = gradio_sets
        self.kept: OrderedDict[Path, _Kept] = OrderedDict()  # least recently used first
        self.kept_bytes = 0
        self.refused: dict[str, float] = {}  # visitors refused an upload -> when (forgotten after keep_s)
        self.peak_bytes = 0  # the most ever kept at once (benchmarks read it)
        self.clock = time.monotonic  # seconds; tests may set their own

    # Uploads

    def uploaded(self, paths: Iterable[str], visitor: str) -> str | None:
        """Note `visitor`'s new uploads; None, or the sentence that refuses them (they are removed, unless another
        visitor keeps the same photo)."""
        now = self.clock()
        new = [path for path in map(self._inside, paths) if path is not None and path.is_file()]
        mine = {path: kept for path, kept in self.kept.items() if self._holds(kept, visitor, now)}
        adding = sum(path.stat().st_size for path in set(new) if path not in mine)
        if sum(kept.size for kept in mine.values()) + adding > self.visitor_bytes:
            for path in new:
                if path not in self.kept:
                    self._remove(path)
            self.refused[visitor] = now
            return self._too_many(visitor, now)
        for path in new:
            self._add(path, now).claims[visitor] = now
        self._make_room()
        return None

    def refusal(self, visitor: str) -> str | None:
        """The sentence that refused `visitor`'s latest upload, if one was refused within `keep_s`."""
        now = self.clock()
        refused = self.refused.get(visitor)
        return self._too_many(visitor, now) if refused is not None and now - refused < self.keep_s else None

    def _too_many(self, visitor: str, now: float) -> str:
        """Too many uploads, and how long until the oldest of the visitor's claims lapses."""
        claims = [kept.claims[visitor] for kept in self.kept.values() if self._holds(kept, visitor, now)]
        return too_many_uploads(max(1.0, min(claims, default=now) + self.keep_s - now))

    @contextlib.contextmanager
    def using(self, path: str, visitor: str) -> Iterator[Path | None]:
        """`visitor`'s upload at `path`, kept for the length of the block and `keep_s` after it; None when they
        hold no claim on it (it lapsed, or they never uploaded it), whoever else keeps the same photo."""
        inside = self._inside(path)
        kept = self.kept.get(inside) if inside is not None else None
        if kept is None or not self._holds(kept, visitor, self.clock()):
            yield None
            return
        kept.in_use += 1
        self._touch(inside, kept, visitor)
        try:
            yield inside
        finally:
            kept.in_use -= 1
            if self.kept.get(inside) is kept:
                self._touch(inside, kept, visitor)

    # Results

    def save_result(self, data: bytes, name: str) -> Path:
        """Write a result where Gradio caches it (Gradio finds it there and serves it as it is); it is in use until
        its first fetch."""
        path = Path(save_bytes_to_cache(data, name, self.given_dir)).resolve()
        self._add(path, self.clock()).in_use = 1
        self._make_room()
        return path

    def fetched(self, path: str) -> None:
        """A file was served: a result's fetch is a use of it (an upload's preview is not: only runs renew it)."""
        inside = self._inside(path)
        kept = self.kept.get(inside) if inside is not None else None
        if kept is not None and not kept.claims:
            kept.in_use = 0
            self._touch(inside, kept)

    # Keeping within bounds

    def sweep(self) -> None:
        """Remove the files unused for `keep_s` (its last claim lapsed, or a result not fetched again), but for an
        upload a job still runs on."""
        expired = self.clock() - self.keep_s
        self.refused = {visitor: when for visitor, when in self.refused.items() if when > expired}
        for path, kept in list(self.kept.items()):
            if kept.used > expired:
                break  # least recently used first: the rest are newer
            if not (kept.in_use and kept.claims):
                self._drop(path)

    def _holds(self, kept: _Kept, visitor: str, now: float) -> bool:
        """Whether `visitor` holds a claim on an upload that has not lapsed."""
        return now - kept.claims.get(visitor, -math.inf) < self.keep_s

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_EVERY_S, max(0.2, self.keep_s / 4)))
            try:
                self.sweep()
            except Exception as error:  # the next sweep tries again; the log names no file
                logger.error("Sweeping the kept files failed with %s.", type(error).__name__)

    def _add(self, path: Path, now: float) -> _Kept:
        kept = self.kept.get(path)
        if kept is None:
            kept = self.kept[path] = _Kept(size=path.stat().st_size, used=now)
            self.kept_bytes += kept.size
            self.peak_bytes = max(self.peak_bytes, self.kept_bytes)
        self._touch(path, kept)
        return kept

    def _touch(self, path: Path, kept: _Kept, visitor: str | None = None) -> None:
        kept.used = self.clock()
        if visitor is not None:
            kept.claims[visitor] = kept.used
        self.kept.move_to_end(path)

    def _make_room(self) -> None:
        """Remove the least recently used files not in use until all kept files fit the quota."""
        for path, kept in list(self.kept.items()):
            if self.kept_bytes <= self.quota_bytes:
                return
            if not kept.in_use:
                self._drop(path)

    def _drop(self, path: Path) -> None:
        self.kept_bytes -= self.kept.pop(path).size
        self._remove(path)

    def _remove(self, path: Path) -> None:
        """Delete a file in the cache folder, and first Gradio's records of it (by any name Gradio gives it)."""
        given = os.path.join(self.given_dir, path.relative_to(self.cache_dir))
        names = {str(path), given, os.path.abspath(given)}
        for records in self.gradio_sets:
            records.difference_update(names)
        path.unlink(missing_ok=True)
        if path.parent != self.cache_dir:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # its content-hash folder, once empty

    def _inside(self, path: str) -> Path | None:
        with contextlib.suppress(OSError, ValueError):
            resolved = Path(path).resolve()
            if resolved.is_relative_to(self.cache_dir):
                return resolved
        return None


class FilesMiddleware:
    """ASGI middleware (inside the guard): notes each upload (refusing a visitor's surplus with a sentence) and each
    file served, and serves the example photo.

    An upload is its visitor's as `Callers.visitor_of` names them from the upload request: the address, or the Hugging
    Face user when signed in (Gradio's OAuth session middleware runs outside this one, so the session is there).
    """

    def __init__(self, app: object, *, files: Files, callers: Callers, example: bytes) -> None:
        self.app = app
        self.files = files
        self.callers = callers
        self.example = example
        self.sweeper: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.sweeper is None:  # started in the server's own event loop, on its first request
            self.sweeper = asyncio.get_running_loop().create_task(self.files.sweep_forever())
        path, method = _path(scope), scope["method"]
        if method == "GET" and path == EXAMPLE_ROUTE:
            await _send(send, 200, self.example, b"image/png", b"public, max-age=3600")
        elif method == "POST" and path == UPLOAD:
            await self._upload(scope, receive, send)
        elif method == "GET" and path.startswith(FILE):

            async def watch(message: Message) -> None:
                # Served, in part, or already in the browser's cache: a use all the same, counted before the bytes
                # go out (whoever has them has seen this use counted).
                if message["type"] == "http.response.start" and message["status"] in (200, 206, 304):
                    self.files.fetched(path.removeprefix(FILE))
                await send(message)

            await self.app(scope, receive, watch)
        else:
            await self.app(scope, receive, send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Let Gradio store the upload, then send its answer on, or a 429 with the sentence that refuses it."""
        messages: list[Message] = []

        async def keep(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        if start is not None and start["status"] == 200:
            body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
            with contextlib.suppress(ValueError):
                paths = [p for p in json.loads(body) if isinstance(p, str)]
                visitor = await self.callers.visitor_of(Request(scope))
                refusal = self.files.uploaded(paths, visitor)
                if refusal and not _from_gradio_client(scope):
                    await _send(send, 429, refusal.encode(), b"text/plain; charset=utf-8", b"no-store")
                    return
                # gradio_client shows an upload's error as HTTP jargon: it gets its path (kept for no one), and its
                # run the sentence (Files.refusal), as AppError.
        for message in messages:
            await send(message)


def _from_gradio_client(scope: Scope) -> bool:
    agent = dict(scope.get("headers") or []).get(b"user-agent", b"")
    return b"gradio_client/" in agent


def _path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _send(send: Send, status: int, body: bytes, content_type: bytes, cache: bytes) -> None:
    length = str(len(body)).encode()
    headers = [(b"content-type", content_type), (b"content-length", length), (b"cache-control", cache)]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
