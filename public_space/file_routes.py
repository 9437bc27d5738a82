"""The requests that bring and fetch files, as files.py counts them: uploads (a visitor's surplus refused with a
sentence), fetches of kept files (each served only to whom it is for, with no header of the request in its answer),
and the example photo (served from memory, so that no page shows where it lies on the server).

An upload is its visitor's as `Callers.visitor_of` names them from the upload request: the address, an account's
token, or the Hugging Face user when signed in (Gradio's OAuth session middleware runs outside this one, so the
session is there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from files import Files
from guard import UPLOAD, Message, Receive, Scope, Send, route_path
from visitors import Callers

FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")  # the second, Gradio's older spelling of the first
# The headers of a file's answer; any other is dropped (Gradio's ranged answer copies in the request's own).
FILE_HEADERS = frozenset(
    name.encode()
    for name in (
        "content-type", "content-length", "content-range", "accept-ranges", "content-disposition", "content-encoding",
        "etag", "last-modified", "cache-control", "expires", "vary", "date", "x-content-type-options",
    )
)  # fmt: skip
EXAMPLE_ROUTE = "/examples/astronaut.png"


class FileRoutes:
    """ASGI middleware (inside the guard) for the requests that bring and fetch files (see the module's docstring)."""

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
        path, method = route_path(scope), scope["method"]
        if method == "GET" and path == EXAMPLE_ROUTE:
            example = Response(self.example, media_type="image/png", headers={"cache-control": "public, max-age=3600"})
            await example(scope, receive, send)
        elif method == "POST" and path == UPLOAD:
            await self._upload(scope, receive, send)
        elif method in ("GET", "HEAD") and (file := _file_asked(path)) is not None:
            await self._file(scope, receive, send, file)
        else:
            await self.app(scope, receive, send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Let Gradio store the upload, then send its answer on, or a 429 with the sentence that refuses it."""
        messages: list[Message] = []

        async def keep(message: Message) -> None:
            messages.append(message)

        with self.files.receiving() as receipt:
            await self.app(scope, receive, keep)
            start = next((m for m in messages if m["type"] == "http.response.start"), None)
            if start is None or start["status"] != 200:
                for message in messages:
                    await send(message)
                return
            body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
            with contextlib.suppress(ValueError):
                answer = json.loads(body)
                paths = [p for p in answer if isinstance(p, str)] if isinstance(answer, list) else []
                visitor = await self.callers.visitor_of(Request(scope))
                refusal = self.files.uploaded(paths, visitor)
                receipt.stored = True
                if refusal and not _from_gradio_client(scope):
                    refused = Response(refusal, 429, media_type="text/plain", headers={"cache-control": "no-store"})
                    await refused(scope, receive, send)
                    return
                if refusal:
                    # gradio_client shows an upload's error as HTTP jargon: it gets paths that name nothing (the
                    # same whoever keeps the same photo), and its run the sentence (Files.refusal), as AppError.
                    placeholders = json.dumps([self.files.placeholder(p) for p in paths]).encode()
                    messages = _answer(start, placeholders)
        for message in messages:
            await send(message)

    async def _file(self, scope: Scope, receive: Receive, send: Send, file: str) -> None:
        """Serve a kept file to whom it is for (anyone else is answered as for a missing file), with only the
        headers of a file's answer: Gradio's ranged answer copies the request's headers (cookies, the proxy's)
        into its own."""
        if not self.files.servable(file, await self.callers.visitor_of(Request(scope))):
            await JSONResponse({"detail": f"File not allowed: {file}."}, 403)(scope, receive, send)  # Gradio's words
            return
        # A request header on the list below would come back as the answer's own: it does not reach Gradio.
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in FILE_HEADERS]}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() in FILE_HEADERS]
                message = {**message, "headers": headers}
                # Served, in part, or already in the browser's cache: a use all the same, counted before the bytes
                # go out (whoever has them has seen this use counted).
                if message["status"] in (200, 206, 304):
                    self.files.fetched(file)
            await send(message)

        await self.app(scope, receive, watch)


def _file_asked(path: str) -> str | None:
    """The file a request asks for, by either of Gradio's routes for files; None for any other route."""
    for route in FILE_ROUTES:
        if path.startswith(route):
            return path.removeprefix(route)
    return None


def _from_gradio_client(scope: Scope) -> bool:
    agent = dict(scope.get("headers") or []).get(b"user-agent", b"")
    return b"gradio_client/" in agent


def _answer(start: Message, body: bytes) -> list[Message]:
    """An answer like `start`'s with another body."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    return [{**start, "headers": headers}, {"type": "http.response.body", "body": body}]
