"""Nothing piles up on disk: an upload goes once its request has read it, a result shortly after it has been
fetched, and whatever is left (a photo never sent, a result never fetched) after `keep_s`.

"Shortly after": gradio_client fetches a generator's last output twice (from its last update and from the final
message), so a result goes at its second fetch, or `FETCHED_KEEP_S` after its first (a browser fetches once).

Gradio stores uploads by content (`<cache>/<sha256>/<name>`), so two uploads of one photo are one file: each
upload response counts one claim on its file for the visitor who uploaded it, each request that reads it takes one
of its own visitor's claims (never another visitor's), and the file goes once the last claim has been taken and
read. The middleware also serves the example photo, so that no page shows where it lies on the server.

Gradio keeps a record of every file it made (`Blocks.temp_file_sets`) for its own `delete_cache` sweep, which
skips, and so keeps forever, the record of a file already gone: each file removed here is taken off them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from starlette.requests import Request

from guard import Message, Receive, Scope, Send
from visitors import visitor_of

UPLOAD = "/gradio_api/upload"
FILE = "/gradio_api/file="
EXAMPLE_ROUTE = "/examples/astronaut.png"
FETCHED_KEEP_S = 5.0


class Files:
    """This app's uploads and results in Gradio's cache folder, and when each arrived."""

    def __init__(
        self, cache_dir: str | Path, keep_s: float, *, trusted_hops: int, gradio_sets: list[set[str]]
    ) -> None:
        """`trusted_hops` names an upload's visitor as the endpoint names it (visitors.py); `gradio_sets` is
        `Blocks.temp_file_sets` itself (the list, which Gradio extends as components are made)."""
        self.given_dir = str(cache_dir)  # Gradio's records name files under the folder as it was given ...
        self.cache_dir = Path(cache_dir).resolve()  # ... and these, under the folder itself
        self.keep_s = keep_s
        self.trusted_hops = trusted_hops
        self.gradio_sets = gradio_sets
        self.uploads: dict[Path, list[tuple[str, float]]] = {}  # a file -> its unused uploads: by whom, and when
        self.reading: dict[Path, int] = {}  # a file -> requests reading it now
        self.results: dict[str, float] = {}  # a result's file name (unique) -> when it was made
        self.fetched: set[str] = set()  # results fetched once, going at their second fetch or soon after the first
        self.swept = time.monotonic()

    def uploaded(self, paths: Iterable[str], visitor: str) -> None:
        now = time.monotonic()
        for path in filter(None, map(self._inside, paths)):
            self.uploads.setdefault(path, []).append((visitor, now))
        if now - self.swept > min(30.0, self.keep_s):
            self.sweep(now)

    def take(self, path: str, visitor: str) -> Path | None:
        """Take one of `visitor`'s uploads of `path` to read it, then call `used`; None: they have none left
        (used up, expired, or never uploaded by them), whatever other visitors' uploads of the same photo wait."""
        inside = self._inside(path)
        claims = self.uploads.get(inside, []) if inside is not None else []
        mine = next((i for i, (uploader, _) in enumerate(claims) if uploader == visitor), None)
        if inside is None or mine is None:
            return None
        del claims[mine]
        self.reading[inside] = self.reading.get(inside, 0) + 1
        return inside

    def used(self, path: Path) -> None:
        """A taken upload has been read: the file goes unless another upload of it waits or is being read."""
        self.reading[path] -= 1
        if not self.reading[path]:
            del self.reading[path]
        self._forget(path)

    def _forget(self, path: Path) -> None:
        if not self.uploads.get(path) and path not in self.reading:
            self.uploads.pop(path, None)
            self._remove(path)

    def made(self, *names: str) -> None:
        self.results.update(dict.fromkeys(names, time.monotonic()))

    def delivered(self, path: str) -> None:
        inside = self._inside(path)
        if inside is None:
            return
        if inside.name in self.fetched:
            self.fetched.discard(inside.name)
            self._remove(inside)
        elif self.results.pop(inside.name, None) is not None:
            self.fetched.add(inside.name)
            asyncio.get_running_loop().call_later(FETCHED_KEEP_S, self._gone, inside)

    def _gone(self, path: Path) -> None:
        self.fetched.discard(path.name)
        self._remove(path)

    def sweep(self, now: float) -> None:
        """Remove what has waited longer than `keep_s`."""
        self.swept, expired = now, now - self.keep_s
        for path, claims in list(self.uploads.items()):
            claims[:] = [(uploader, arrived) for uploader, arrived in claims if arrived > expired]
            self._forget(path)
        for name, made in list(self.results.items()):
            if made <= expired:
                del self.results[name]
                for path in self.cache_dir.glob(f"*/{name}"):
                    self._remove(path)

    def _remove(self, path: Path) -> None:
        """Delete a file in the cache folder, and first Gradio's records of it (by any name Gradio gives it)."""
        given = os.path.join(self.given_dir, path.relative_to(self.cache_dir))
        names = {str(path), given, os.path.abspath(given)}
        for records in self.gradio_sets:
            records.difference_update(names)
        path.unlink(missing_ok=True)

    def _inside(self, path: str) -> Path | None:
        with contextlib.suppress(OSError, ValueError):
            resolved = Path(path).resolve()
            if resolved.is_relative_to(self.cache_dir):
                return resolved
        return None


class FilesMiddleware:
    """ASGI middleware (inside the guard): notes each upload and each delivered result, and serves the example.

    An upload is its visitor's as `visitor_of` names them from the upload request: the address, or the Hugging
    Face user when signed in (Gradio's OAuth session middleware runs outside this one, so the session is there).
    """

    def __init__(self, app: object, *, files: Files, example: bytes) -> None:
        self.app = app
        self.files = files
        self.example = example

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = _path(scope), scope["method"]
        if method == "GET" and path == EXAMPLE_ROUTE:
            await _send_example(send, self.example)
        elif method == "POST" and path == UPLOAD:
            body = await self._watched(scope, receive, send)
            if body is not None:
                with contextlib.suppress(ValueError):
                    paths = json.loads(body)
                    visitor = visitor_of(Request(scope), self.files.trusted_hops)
                    self.files.uploaded((p for p in paths if isinstance(p, str)), visitor)
        elif method == "GET" and path.startswith(FILE):
            if await self._watched(scope, receive, send, keep_body=False) is not None:
                self.files.delivered(path.removeprefix(FILE))
        else:
            await self.app(scope, receive, send)

    async def _watched(self, scope: Scope, receive: Receive, send: Send, *, keep_body: bool = True) -> bytes | None:
        """Pass the request on; return the response body (b"" unless `keep_body`) if it was a complete 200."""
        status, chunks, complete = 0, [], False

        async def watch(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if keep_body:
                    chunks.append(message.get("body", b""))
                complete = not message.get("more_body", False)
            await send(message)

        await self.app(scope, receive, watch)
        return b"".join(chunks) if status == 200 and complete else None


def _path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _send_example(send: Send, photo: bytes) -> None:
    headers = [
        (b"content-type", b"image/png"),
        (b"content-length", str(len(photo)).encode()),
        (b"cache-control", b"public, max-age=3600"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": photo})
