"""The wait before you run, and the line's promise: how long the line is now, and no photo admitted past it.

The figure comes from what the front already knows of its backends (the jobs it has out to each, and when each
backend said they would finish: `Backends.ranked`, `Figures.expected_finish`), so no viewer costs a backend call.
With `max_wait_s`, a new photo that would be done later than that is refused at once (`WaitLine.admit`), before
it is sent, and the page says the line is closed for now. The page reads the figure from a plain GET served by
this middleware, not a Gradio event, so it can run nothing (invariant 2); it carries counts and seconds only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

from starlette.responses import JSONResponse

from guard import Receive, Scope, Send, route_path
from pool import Backends
from relay import RelayError

WAIT_ROUTE = "/backdrop/wait"
POLL_S = 5  # how often an open page asks again (and at once whenever its own status line changes)
NO_WAIT = "No wait right now"


class LineTooLong(RelayError):
    """A new photo would wait longer than the line promises (MAX_WAIT_S)."""


class WaitLine:
    """The line as a visitor sees it before they run."""

    def __init__(self, pool: Backends | None, *, max_wait_s: float, about: Callable[[float], str]) -> None:
        self.pool = pool
        self.max_wait_s = max_wait_s  # 0: no promise
        self.about = about

    def seconds(self) -> float | None:
        """Seconds until a photo sent now would be done (0 with nothing out; None before any figure is known)."""
        if self.pool is None or not any(one.figures.jobs for one in self.pool.backends):
            return 0.0
        now = time.monotonic()
        known = [one.figures.gap for one in self.pool.backends if one.figures.gap]
        return round(self.pool.ranked(now)[0].figures.expected_finish(now, min(known)), 1) if known else None

    def closed(self, seconds: float | None) -> bool:
        """Whether a photo that would be done in `seconds` is refused: longer than the promise, and longer in words
        too (a wait of 10.3 s, "about 10 s", is not refused for a promise of 10 s)."""
        if not self.max_wait_s or seconds is None or seconds <= self.max_wait_s:
            return False
        return self.about(seconds) != self.about(self.max_wait_s)

    def admit(self) -> None:
        """Refuse a new photo (LineTooLong, with the wait in its sentence) while the line is longer than promised."""
        if self.closed(seconds := self.seconds()):
            raise LineTooLong(
                f"The line is too long right now: a photo sent now would be done in {self.about(seconds)}, and "
                f"this Space lets no one wait more than {self.about(self.max_wait_s).removeprefix('about ')}. "
                "Please try again in a few minutes."
            )

    def figure(self) -> dict[str, object]:
        """{"ahead": photos sent and not finished, "seconds": until a photo sent now would be done or None,
        "closed": whether a new photo is refused now, "text": the line the page shows}."""
        if self.pool is None:
            return {"ahead": 0, "seconds": None, "closed": False, "text": ""}
        ahead, seconds = sum(len(one.figures.jobs) for one in self.pool.backends), self.seconds()
        if waiting := len(self.pool.line):  # photos no backend has taken yet: each is away (asleep, restarting)
            photos = "1 photo waits" if waiting == 1 else f"{waiting} photos wait"
            text = f"The image service is starting · {photos} for it"
            return {"ahead": ahead + waiting, "seconds": None, "closed": False, "text": text}
        if self.closed(seconds):
            text = f"The line is closed for now: a photo sent now would be done in {self.about(seconds)}"
        elif not ahead:
            text = NO_WAIT
        else:
            photos = "1 photo ahead" if ahead == 1 else f"{ahead} photos ahead"
            text = photos if seconds is None else f"{photos} · {self.about(seconds)}"
        return {"ahead": ahead, "seconds": seconds, "closed": self.closed(seconds), "text": text}


class ReadOnlyRoutes:
    """ASGI middleware (inside the guard) answering the page's read-only GETs, each a function of the request's
    scope that returns JSON; everything else passes. They run nothing and tell a page only what it may know."""

    def __init__(self, app: object, *, routes: dict[str, Callable[[Scope], object]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self.routes.get(route_path(scope)) if scope["type"] == "http" and scope["method"] == "GET" else None
        if answer is None:
            await self.app(scope, receive, send)
            return
        await JSONResponse(answer(scope), headers={"cache-control": "no-store"})(scope, receive, send)


def poll_js(elem_id: str, status_id: str, under_way: Sequence[str]) -> str:
    """Browser-only: show the figure in `#elem_id` now, every POLL_S while the page is visible, and at once when
    the visitor's own status line (`#status_id`) says their job is over (it begins with none of `under_way`)."""
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
        const underWay = {json.dumps(list(under_way))};
        const status = document.querySelector("#{status_id}");
        let said = "";
        const ended = () => {{
            const line = status.innerText.trim();
            if (line !== said && line && !underWay.some((start) => line.startsWith(start))) show();
            said = line;
        }};
        const watched = {{subtree: true, childList: true, characterData: true}};
        if (status) new MutationObserver(ended).observe(status, watched);
    }}"""
