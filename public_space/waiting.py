"""The wait before you run: how long the line is now, as a read-only JSON route the page polls from the browser.

The figure comes from what the front already knows of its backends (the jobs it has out to each, and when each
backend said they would finish: `Backends.ranked`, `Figures.expected_finish`), so no viewer costs a backend call.
It is a plain GET served by this middleware, not a Gradio event, so it can run nothing (invariant 2), and it
carries counts and seconds only, never a visitor's data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from backends import Backends
from guard import Receive, Scope, Send

WAIT_ROUTE = "/backdrop/wait"
POLL_S = 5  # how often an open page asks again
NO_WAIT = "No wait right now"


def line_now(pool: Backends | None, about: Callable[[float], str]) -> dict[str, object]:
    """{"ahead": photos sent and not finished, "seconds": until a photo sent now would be done or None, "text"}."""
    if pool is None:
        return {"ahead": 0, "seconds": None, "text": ""}
    ahead = sum(len(one.figures.jobs) for one in pool.backends)
    if not ahead:
        return {"ahead": 0, "seconds": 0, "text": NO_WAIT}
    now = time.monotonic()
    known = [one.figures.gap for one in pool.backends if one.figures.gap]
    best = pool.ranked(now)[0]
    seconds = round(best.figures.expected_finish(now, min(known)), 1) if known else None
    photos = "1 photo ahead" if ahead == 1 else f"{ahead} photos ahead"
    return {"ahead": ahead, "seconds": seconds, "text": photos if seconds is None else f"{photos} · {about(seconds)}"}


class WaitMiddleware:
    """ASGI middleware (inside the guard) answering GET `WAIT_ROUTE` with `line_now`; everything else passes."""

    def __init__(self, app: object, *, figure: Callable[[], dict[str, object]]) -> None:
        self.app = app
        self.figure = figure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        root = scope.get("root_path", "") if scope["type"] == "http" else ""
        path = scope.get("path", "")
        path = path[len(root) :] if root and path.startswith(root) else path
        if scope["type"] != "http" or scope["method"] != "GET" or path != WAIT_ROUTE:
            await self.app(scope, receive, send)
            return
        body = json.dumps(self.figure()).encode()
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def poll_js(elem_id: str) -> str:
    """Browser-only: show the figure in `#elem_id` now and every POLL_S while the page is visible."""
    return f"""() => {{
        const show = async () => {{
            if (document.hidden) return;
            try {{
                const line = await (await fetch("{WAIT_ROUTE.lstrip("/")}", {{cache: "no-store"}})).json();
                const box = document.querySelector("#{elem_id}");
                if (box) box.innerText = line.text;
            }} catch (error) {{}}  // the next poll tries again
        }};
        show();
        setInterval(show, {POLL_S * 1000});
        document.addEventListener("visibilitychange", show);
    }}"""
