"""Who a visitor is, and each visitor's fair share of the GPU queue: a few jobs at once and a few a minute.

A visitor is a Hugging Face account when the caller names one (signed in on the page, or a token from Python:
accounts.py), else their address as the last trusted proxy saw it. `X-Forwarded-For` lists the addresses a request
came through, each proxy appending the one it saw; the entries to the left of those the trusted proxies appended
are whatever the client wrote, so only the entry the outermost trusted proxy appended (the `trusted_hops`-th from
the right) names the visitor, and with no trusted proxy (`0`, the default) the socket's own address does. Counting
one hop too few makes every visitor look like that proxy (stricter, never spoofable); one too many lets clients
pick a name. An account and an address each have a share of their own size (`Share`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from accounts import Accounts

ACCOUNT = "user "  # how a visitor's name begins when it is an account ("user NAME"); else "address A"


class Callers:
    """Names the visitor behind each request (`visitor_of`): the same name for their upload and for their run."""

    def __init__(self, trusted_hops: int, accounts: Accounts | None = None) -> None:
        self.trusted_hops = trusted_hops
        self.accounts = accounts  # None: tokens name no one

    async def visitor_of(self, request: Any) -> str:
        """ "user NAME" for an account (signed in, or their token's), else "address A" (`request`: a gr.Request or a
        Starlette request)."""
        if username := signed_in(request):
            return f"{ACCOUNT}{username}"
        address = address_of(request, self.trusted_hops)
        token = bearer(request.headers)
        if token and self.accounts is not None and (name := await self.accounts.account_of(token, address)):
            return f"{ACCOUNT}{name}"
        return address


def signed_in(request: Any) -> str | None:
    """Gradio's `request.username`, else the Hugging Face account of an OAuth sign-in (`hf_oauth: true`)."""
    if username := getattr(request, "username", None):
        return username
    raw = getattr(request, "request", request)  # the Starlette request; its scope has a session only with OAuth on
    session = raw.scope.get("session") if raw is not None else None
    info = (session or {}).get("oauth_info") or {}
    return (info.get("userinfo") or {}).get("preferred_username")


def bearer(headers: Any) -> str | None:
    """The token a caller sends as gradio_client does (`x-hf-authorization`, then `authorization`), if any."""
    for name in ("x-hf-authorization", "authorization"):
        scheme, _, token = (headers.get(name) or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def address_of(request: Any, trusted_hops: int) -> str:
    """ "address A": the address the outermost trusted proxy saw (an IPv6 address: its /64)."""
    peer = request.client.host if getattr(request, "client", None) else "unknown"
    headers = request.headers
    values = headers.getlist("x-forwarded-for") if hasattr(headers, "getlist") else [headers.get("x-forwarded-for")]
    entries = [entry.strip() for value in values if value for entry in value.split(",")]
    address = entries[-trusted_hops] if 0 < trusted_hops <= len(entries) else peer
    return f"address {_network(address)}"


def _network(address: str) -> str:
    """One name per address, however it is written; an IPv6 client holds a whole /64, so that is one visitor."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]  # not an address (a proxy that appends names): a bounded key all the same
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class Share:
    """One kind of visitor's share: `jobs` waiting or running at once (0: no limit), `rate` photos per window in the
    `limits` notation ("6/minute", "20/hour"; "": no limit)."""

    jobs: int
    rate: str

    def words(self) -> str:
        """The share as a visitor reads it: "2 photos at once and 12 a minute"."""
        parts = [f"{self.jobs} photo{'s' * (self.jobs != 1)} at once"] if self.jobs else []
        if self.rate:
            item = parse(self.rate)
            unit = item.GRANULARITY.name
            window = f"a{'n' * (unit == 'hour')} {unit}" if item.multiples == 1 else f"every {item.multiples} {unit}s"
            parts.append(f"{item.amount} {window}" if parts else f"{item.amount} photos {window}")
        return " and ".join(parts) or "no limit"


class TurnedAway(Exception):
    """A visitor turned away by their fair share: its message is the sentence that says why (and when to try again)."""

    def __init__(self, sentence: str, reason: str) -> None:
        super().__init__(sentence)
        self.reason = reason  # "fair_share" or "rate", for the metrics


class FairShare:
    """Each visitor's share (an account's or an address's), counted over a sliding window in memory that forgets a
    visitor once their window has passed; a visitor's job count is dropped with their last job, so neither grows
    with the number of visitors seen.

    A job holds a slot from its admission (`slot`) and spends one of the visitor's photos when it is really served
    (`spend`: a kept answer or a job sent), so a photo refused before (the line too long, say) costs none. A refusal
    of an address's share says what an account's share is and how to have one: signing in on the page (where the
    page has the button: `sign_in`), a token from Python.
    """

    def __init__(self, address: Share, account: Share, *, sign_in: bool = False) -> None:
        self.shares = {False: address, True: account}
        self.sign_in = sign_in
        self.rates: dict[bool, RateLimitItem | None] = {
            kind: parse(s.rate) if s.rate else None for kind, s in self.shares.items()
        }
        self.limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.jobs: dict[str, int] = {}

    @contextlib.contextmanager
    def slot(self, visitor: str, *, on_page: bool) -> Iterator[None]:
        """Hold one of `visitor`'s slots for the length of the block, however it ends; TurnedAway when none is free
        or their photos for this window are spent."""
        account = visitor.startswith(ACCOUNT)
        held, jobs = self.jobs.get(visitor, 0), self.shares[account].jobs
        if jobs and held >= jobs:
            photos = "photo" if held == 1 else "photos"
            sentence = f"You already have {held} {photos} in line. Please wait until one is done."
            raise self._turned_away(sentence, "fair_share", visitor, on_page)
        if (rate := self.rates[account]) is not None and not self.limiter.test(rate, visitor):
            raise self._turned_away(self._too_many(rate, visitor), "rate", visitor, on_page)
        self.jobs[visitor] = held + 1
        try:
            yield
        finally:
            self.release(visitor)

    def spend(self, visitor: str, *, on_page: bool) -> None:
        """Count one of `visitor`'s photos for the window; TurnedAway if a photo sent meanwhile spent the last."""
        rate = self.rates[visitor.startswith(ACCOUNT)]
        if rate is not None and not self.limiter.hit(rate, visitor):
            raise self._turned_away(self._too_many(rate, visitor), "rate", visitor, on_page)

    def release(self, visitor: str) -> None:
        """Give back a slot (once the job is done, failed, cancelled, or its visitor left)."""
        left = self.jobs.get(visitor, 0) - 1
        if left > 0:
            self.jobs[visitor] = left
        else:
            self.jobs.pop(visitor, None)

    def _too_many(self, rate: RateLimitItem, visitor: str) -> str:
        reset = self.limiter.get_window_stats(rate, visitor).reset_time
        unit = rate.GRANULARITY.name
        window = unit if rate.multiples == 1 else f"{rate.multiples} {unit}s"
        wait = max(1, math.ceil(reset - time.time()))
        return f"You have sent too many photos in the last {window}. Please try again in {wait} s."

    def _turned_away(self, sentence: str, reason: str, visitor: str, on_page: bool) -> TurnedAway:
        """The refusal, saying for an address what an account's share is and how to have one."""
        if visitor.startswith(ACCOUNT) or (on_page and not self.sign_in):
            return TurnedAway(sentence, reason)
        how = "sign in with Hugging Face" if on_page else "call with your Hugging Face token (Client(..., token=...))"
        own = f"Everyone at your address shares this limit: {how} for a share of your own"
        return TurnedAway(f"{sentence} {own} ({self.shares[True].words()}).", reason)
