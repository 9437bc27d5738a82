"""Server-side access control for a Gradio app: the routes we name, one invocable endpoint, an optional token lock.

Gradio's `api_visibility` only hides an event from the API page; the server still runs any `fn_index` posted to
the queue and any name posted to `/gradio_api/call|run|api/...`, and each Gradio release can add routes (such as
`/gradio_api/deep_link`, which writes a file for anyone). This ASGI middleware lets through only the routes listed
in `ROUTES` (and those an app adds: `launch_guarded(allowed=...)`), each with the reason it is needed; everything
else is an unknown route (404). Both Spaces carry an identical copy of this file (a test keeps them identical) so
that each folder deploys on its own.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import compile_path

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allowed:
    """A route the guard lets through: its methods (GET brings HEAD), its path as Starlette writes routes
    (`{name}` is one path segment, `{name:path}` the rest; `{api}` is the endpoint's name), why it is needed, and
    whether a request to it runs the endpoint (its body is then read and checked first)."""

    methods: tuple[str, ...]
    path: str
    reason: str
    runs: bool = False


API = "/gradio_api"
QUEUE_JOIN = f"{API}/queue/join"
UPLOAD = f"{API}/upload"
GET, POST = ("GET",), ("POST",)
# Everything a Gradio page and gradio_client need, whatever the app; an app adds its own (launch_guarded).
# (GET /metrics is the guard's own: served to the metrics token only, and otherwise an unknown route.)
ROUTES = (
    Allowed(GET, "/", "the page (HEAD too: Gradio's launch() checks that it answers)"),
    Allowed(GET, "/assets/{path:path}", "the page's scripts and styles"),
    Allowed(GET, "/static/{path:path}", "the page's fonts, and the iframe resizer a Space's page needs"),
    Allowed(GET, "/theme.css", "the page's theme"),
    Allowed(GET, "/favicon.ico", "the page's icon"),
    Allowed(GET, "/config", "the app's description: gradio_client and the relay (relay.py) read it first"),
    Allowed(GET, "/gradio_api/info", "the endpoint's inputs and outputs, for gradio_client and the API page"),
    Allowed(GET, "/gradio_api/startup-events", "Gradio's own launch() starts the queue with it (with no token)"),
    Allowed(POST, "/gradio_api/queue/join", "a run, from the page or gradio_client (its fn_index only)", runs=True),
    Allowed(GET, "/gradio_api/queue/data", "a session's stream: its runs' places, progress and results"),
    Allowed(POST, "/gradio_api/cancel", "Stop on the page, and gradio_client's Job.cancel(): one's own run"),
    Allowed(POST, "/gradio_api/reset", "after a cancel, the page and gradio_client drop the run's stream"),
    Allowed(GET, "/gradio_api/file={path:path}", "pictures: an upload shown, results shown and downloaded"),
    Allowed(POST, "/gradio_api/call/{api}", "the endpoint's REST form (a run), as the API page shows it", runs=True),
    Allowed(POST, "/gradio_api/call/v2/{api}", "the same, as the API page's curl example writes it", runs=True),
    Allowed(GET, "/gradio_api/call/{api}/{event_id}", "the REST form's result stream, by its event id"),
    Allowed(GET, "/gradio_api/call/v2/{api}/{event_id}", "the same, as the API page's curl example writes it"),
)
# Routes that run code of the app's: one that no entry allows gets a 403 and this guard's sentence, not a 404.
INVOKING = re.compile(rf"{API}/(queue/join|call|run|api|component_server|upload)(/.*)?", re.DOTALL)
TOKENLESS = {f"{API}/startup-events"}  # Gradio's own launch() calls it without any token; it only starts the queue
NOT_FOUND = "Not Found"  # FastAPI's own words: a route refused here looks like one that is not there
METRICS = "/metrics"  # the maintainer's read-only figures: served only with the metrics token, else unknown
LOG_EVERY_S = 10.0  # at most one log line per kind of refusal or failure in this time: a flood cannot fill the log


class EndpointGuard:
    """Let through only the allowed routes (else 404, or 403 for a route that runs code), only `api_name`'s runs
    (else 403), and, when `token` is set, only requests that carry it (else 401, before anything else).

    With `check_data`, a run whose `data` it rejects gets a 422: Gradio would print a traceback for values its
    components cannot take. An exception from the app (Gradio raises some for requests it cannot serve, such as
    an unknown session's stream) ends that response here with one short log line instead of a traceback.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        fn_indices: Iterable[int],
        api_name: str,
        token: str | None = None,
        allowed: Sequence[Allowed] = (),
        max_body_bytes: int = 32 * 1024 * 1024,
        check_data: Callable[[Any], bool] | None = None,
        metrics: tuple[str, Callable[[], tuple[bytes, str]]] | None = None,
    ) -> None:
        self.app = app
        self.metrics = (metrics[0].encode(), metrics[1]) if metrics else None
        self.check_data = check_data
        self.fn_indices = frozenset(fn_indices)
        if not self.fn_indices:
            raise ValueError(f"No event is named {api_name!r}.")
        self.api_name = api_name
        self.token = token.encode() if token else None
        self.entries = [(_methods(entry), _pattern(entry, api_name), entry) for entry in (*ROUTES, *allowed)]
        self.max_body_bytes = max_body_bytes
        self.log = _ThrottledLog(LOG_EVERY_S)

    def entry_for(self, method: str, path: str) -> Allowed | None:
        """The entry that lets `method` reach `path` (as `route_path` gives it), or None."""
        for methods, pattern, entry in self.entries:
            if method in methods and pattern.fullmatch(path):
                return entry
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
        elif scope["type"] != "http":  # no route of ours needs a websocket
            await send({"type": "websocket.close", "code": 1008})
        else:
            refusal, receive = await self._check(scope, receive)
            if refusal is None and self._metrics_asked(scope):
                body, content_type = self.metrics[1]()
                await Response(body, media_type=content_type)(scope, receive, send)
            elif refusal is None:
                await self._serve(scope, receive, send)
            else:
                if scope["method"] != "HEAD":  # Gradio's own launch() checks the page with one, on every start
                    self.log.note(str(refusal[0]), "Refused %s %s: %s", scope["method"], _shown(scope), refusal[1])
                await _reply(scope, receive, send, *refusal)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = {"started": False, "ended": False}

        async def tracked(message: Message) -> None:
            state["started"] = state["started"] or message["type"] == "http.response.start"
            state["ended"] = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as error:
            self.log.note("failed", "%s %s failed: %s", scope["method"], _shown(scope), type(error).__name__)
            with contextlib.suppress(Exception):  # the caller may be gone already
                if not state["started"]:
                    await _reply(scope, receive, send, 500, "The request could not be served.")
                elif not state["ended"]:  # a stream already under way: end it cleanly rather than leave it cut
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _check(self, scope: Scope, receive: Receive) -> tuple[tuple[int, str] | None, Receive]:
        """Return the refusal (status, sentence) for this request, if any, and the receive to pass on."""
        method, path = scope["method"], route_path(scope)
        if self.token is not None and path not in TOKENLESS and not self._authorized(scope):
            return (401, "A valid token is required."), receive
        entry = self.entry_for(method, path)
        only = f"Only the {self.api_name} endpoint can be called."
        if entry is None and not self._metrics_asked(scope):
            return ((403, only) if INVOKING.fullmatch(path) else (404, NOT_FOUND)), receive
        if method == "POST" and path != UPLOAD and _content_length(scope) > self.max_body_bytes:
            return (413, "The request is too large."), receive
        if entry is None or not entry.runs:
            return None, receive
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            return (413, "The request is too large."), receive
        message = _json(body)
        if path == QUEUE_JOIN and _fn_index(message) not in self.fn_indices:
            return (403, only), receive
        if self.check_data is not None and not self.check_data(message.get("data")):
            return (422, f"The data does not fit {self.api_name}'s inputs: see the API page."), receive
        return None, _replay(body, receive)

    def _authorized(self, scope: Scope, token: bytes | None = None) -> bool:
        headers = dict(scope["headers"])
        for name in (b"x-hf-authorization", b"authorization"):
            scheme, _, value = headers.get(name, b"").partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), token or self.token or b""):
                return True
        return False

    def _metrics_asked(self, scope: Scope) -> bool:
        """A GET of /metrics with the metrics token; any other request for it is one for an unknown route."""
        if self.metrics is None or scope["method"] != "GET" or route_path(scope) != METRICS:
            return False
        return self._authorized(scope, self.metrics[0])


def launch_guarded(
    blocks: Any,
    *,
    api_name: str,
    token: str | None = None,
    allowed: Sequence[Allowed] = (),
    max_body_bytes: int = 32 * 1024 * 1024,
    middleware: Sequence[Middleware] = (),
    metrics: tuple[str, Callable[[], tuple[bytes, str]]] | None = None,
    **launch_kwargs: Any,
) -> None:
    """Launch `blocks` (a gr.Blocks) behind the guard, hardened, and return once it serves.

    `allowed`: the app's own routes besides `ROUTES` (those its middleware serves, uploads if its page takes any).
    `metrics`: (token, render) to serve GET /metrics with `render()`'s (body, content type) to that token only.
    `middleware`: further ASGI middleware, inside the guard (it sees only the requests the guard lets through).

    `GRADIO_SERVER_NAME` and `GRADIO_SERVER_PORT` apply as in any Gradio app; ZeroGPU's launch hook still runs.
    """
    endpoints = [fn for fn in blocks.fns.values() if fn.api_name == api_name]
    guard = Middleware(
        EndpointGuard,
        fn_indices=[fn._id for fn in endpoints],
        api_name=api_name,
        token=token,
        allowed=allowed,
        max_body_bytes=max_body_bytes,
        check_data=_fits(endpoints[0].inputs, Path(blocks.GRADIO_CACHE)) if endpoints else None,
        metrics=metrics,
    )
    blocks.launch(
        app_kwargs={"middleware": [guard, *middleware]},
        ssr_mode=False,  # a Node front server would fetch pages without the token
        run_history=False,  # nothing about a caller's runs is kept or offered for re-runs
        enable_monitoring=False,
        show_error=False,  # only gr.Error sentences reach callers, never exception texts
        prevent_thread_lock=True,
        **launch_kwargs,
    )


class _ThrottledLog:
    """Warnings of one kind at most once every `every_s` seconds; the next one says how many were left out."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last: dict[str, float] = {}  # one entry per kind: a status code or "failed", so a handful at most
        self.left_out: dict[str, int] = {}

    def note(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -self.every_s) < self.every_s:
            self.left_out[kind] = self.left_out.get(kind, 0) + 1
            return
        self.last[kind] = now
        if left_out := self.left_out.pop(kind, 0):
            message = f"{message} (and {left_out} more like it since the last such line)"
        logger.warning(message, *args)


def _shown(scope: Scope) -> str:
    """The request's path as a log may show it: short, on one line, nothing unprintable."""
    path: str = scope["path"]
    return path[:80].encode("unicode_escape").decode("ascii") + ("…" if len(path) > 80 else "")


def _methods(entry: Allowed) -> frozenset[str]:
    return frozenset(entry.methods) | ({"HEAD"} if "GET" in entry.methods else set())


def _pattern(entry: Allowed, api_name: str) -> re.Pattern[str]:
    return compile_path(entry.path.replace("{api}", api_name))[0]


def _content_length(scope: Scope) -> int:
    value = dict(scope["headers"]).get(b"content-length", b"0")
    return int(value) if value.isdigit() else 0


def route_path(scope: Scope) -> str:
    """The request's path within the app (its root path stripped, repeated and trailing slashes dropped)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    path = re.sub("/{2,}", "/", path)
    return path.rstrip("/") or "/"


def _fits(components: list[Any], uploads: Path) -> Callable[[Any], bool]:
    """Whether a call's data is one value per input that Gradio takes: a string, or a file uploaded to `uploads`."""
    kinds = [(getattr(c, "data_model", None), c.api_info()) for c in components]
    uploads = uploads.resolve()

    def fits(data: Any) -> bool:
        if not isinstance(data, list) or len(data) != len(kinds):
            return False
        for value, (model, info) in zip(data, kinds, strict=True):
            if value is None:
                continue
            if model is not None:
                try:
                    path = getattr(model.model_validate(value), "path", None)
                    if path is not None and not Path(path).resolve().is_relative_to(uploads):
                        return False
                except Exception:
                    return False
            elif (info.get("type") == "string" or "enum" in info) and not isinstance(value, str):
                return False
        return True

    return fits


def _json(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: a body nested thousands deep
        return {}
    return message if isinstance(message, dict) else {}


def _fn_index(message: dict[str, Any]) -> int | None:
    value = message.get("fn_index")
    return value if type(value) is int else None  # exactly int: Gradio would also accept "0" or 0.0


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _reply(scope: Scope, receive: Receive, send: Send, status: int, sentence: str) -> None:
    await JSONResponse({"detail": sentence}, status_code=status)(scope, receive, send)
