"""Who a visitor is, and each visitor's fair share of the GPU queue: a few jobs at once and a few a minute.

A visitor is the signed-in Hugging Face user when there is one, else their address as the last trusted proxy
saw it. `X-Forwarded-For` lists the addresses a request came through, each proxy appending the one it saw; the
entries to the left of those the trusted proxies appended are whatever the client wrote, so only the entry the
outermost trusted proxy appended (the `trusted_hops`-th from the right) names the visitor. Counting one hop too
few makes every visitor look like that proxy (stricter, never spoofable); one too many lets clients pick a name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import time
from collections.abc import Iterator
from typing import Any

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

SHARED_ADDRESS = "Everyone at your address shares this limit: sign in with Hugging Face for a share of your own."


def visitor_of(request: Any, trusted_hops: int) -> str:
    """The visitor behind a request (a `gr.Request`, or a Starlette one): "user NAME", or "address A" (an IPv6
    address: its /64)."""
    if username := _signed_in(request):
        return f"user {username}"
    peer = request.client.host if getattr(request, "client", None) else "unknown"
    headers = request.headers
    values = headers.getlist("x-forwarded-for") if hasattr(headers, "getlist") else [headers.get("x-forwarded-for")]
    entries = [entry.strip() for value in values if value for entry in value.split(",")]
    address = entries[-trusted_hops] if 0 < trusted_hops <= len(entries) else peer
    return f"address {_network(address)}"


def _signed_in(request: Any) -> str | None:
    """Gradio's `request.username`, else the Hugging Face account of an OAuth sign-in (`hf_oauth: true`)."""
    if username := getattr(request, "username", None):
        return username
    raw = getattr(request, "request", request)  # the Starlette request; its scope has a session only with OAuth on
    session = raw.scope.get("session") if raw is not None else None
    info = (session or {}).get("oauth_info") or {}
    return (info.get("userinfo") or {}).get("preferred_username")


def _network(address: str) -> str:
    """One name per address, however it is written; an IPv6 client holds a whole /64, so that is one visitor."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address (a proxy that appends names): a bounded key all the same
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Refusal(str):
    """A refusal's sentence for the visitor, with why (`reason`: "fair_share" or "rate") for the metrics."""

    reason: str

    def __new__(cls, sentence: str, reason: str) -> Refusal:
        refusal = super().__new__(cls, sentence)
        refusal.reason = reason
        return refusal


class TurnedAway(Exception):
    """A visitor turned away by their fair share: its message is the sentence that says why (and when to try again)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(str(refusal))
        self.reason = refusal.reason


class FairShare:
    """At most `max_jobs` jobs per visitor waiting or running at once (0: no limit), and at most `rate` a window.

    `rate` is in the `limits` notation ("6/minute", "20/hour"; "" for no limit), counted over a sliding window
    in memory that forgets a visitor once their window has passed. A visitor's job count is dropped with their
    last job, so neither grows with the number of visitors seen. With `sign_in` (the page has the button), a
    refusal of an address's share says that signing in gives one a share of one's own.
    """

    def __init__(self, max_jobs: int, rate: str, *, sign_in: bool = False) -> None:
        self.max_jobs = max_jobs
        self.sign_in = sign_in
        self.rate: RateLimitItem | None = parse(rate) if rate else None
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.jobs: dict[str, int] = {}

    def admit(self, visitor: str) -> Refusal | None:
        """Take a job slot for `visitor` and return None, or return the sentence that says why not and when."""
        refusal = self._refusal(visitor)
        if refusal is not None and self.sign_in and visitor.startswith("address "):
            return Refusal(f"{refusal} {SHARED_ADDRESS}", refusal.reason)
        return refusal

    def _refusal(self, visitor: str) -> Refusal | None:
        held = self.jobs.get(visitor, 0)
        if self.max_jobs and held >= self.max_jobs:
            photos = "photo" if held == 1 else "photos"
            return Refusal(f"You already have {held} {photos} in line. Please wait until one is done.", "fair_share")
        if self.rate is not None and not self.limiter.hit(self.rate, visitor):
            reset = self.limiter.get_window_stats(self.rate, visitor).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            return Refusal(
                f"You have sent too many photos in the last {self._window()}. Please try again in {wait} s.", "rate"
            )
        self.jobs[visitor] = held + 1
        return None

    @contextlib.contextmanager
    def slot(self, visitor: str) -> Iterator[None]:
        """Hold one of `visitor`'s slots for the length of the block, however it ends; TurnedAway when none is free."""
        if refusal := self.admit(visitor):
            raise TurnedAway(refusal)
        try:
            yield
        finally:
            self.release(visitor)

    def release(self, visitor: str) -> None:
        """Give back a slot taken by `admit` (once the job is done, failed, cancelled, or its visitor left)."""
        left = self.jobs.get(visitor, 0) - 1
        if left > 0:
            self.jobs[visitor] = left
        else:
            self.jobs.pop(visitor, None)

    def _window(self) -> str:
        unit = self.rate.GRANULARITY.name
        return unit if self.rate.multiples == 1 else f"{self.rate.multiples} {unit}s"
