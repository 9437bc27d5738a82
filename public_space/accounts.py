"""A Python caller's Hugging Face account: the one their token belongs to, as the Hub's whoami says.

`gradio_client.Client("owner/backdrop", token=...)` sends the caller's token on every request, as
`x-hf-authorization: Bearer …` (and `authorization`). That is the way taken here, rather than gradio_client's
`oauth_token=`: every gradio_client since 1.11 sends it, for the upload as for the run (so both name the same
caller), and it needs no `gr.OAuthToken` parameter in the endpoint's signature; on the page, the OAuth session
already names a signed-in visitor. The token itself is never kept nor logged: each answer is kept a few minutes
under the token's SHA-256 digest, in a bounded cache (cachetools), so a caller's requests make one Hub call, not
one each. A token the Hub refuses, a Hub that does not answer within `timeout_s`, or more new tokens from one
address than `lookups_per_address` leave the caller an address visitor: never an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import cachetools
from huggingface_hub import HfApi, get_session
from huggingface_hub.errors import HfHubHTTPError
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

logger = logging.getLogger("backdrop")

KNOWN_S = 300.0  # an account the Hub named (or a token it refused) is kept this long
UNKNOWN_S = 30.0  # no answer (the Hub failed or was slow): asked again after this
HUB_TIMEOUT_S = 10.0  # any call this app makes to the Hub gives up after this (huggingface_hub's own: never)


class Accounts:
    """Tokens to account names, asked of the Hub (`endpoint`: its address; None: huggingface_hub's own)."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 3.0,
        max_kept: int = 4096,
        lookups_at_once: int = 4,
        lookups_per_address: str = "10/minute",
    ) -> None:
        self.api = HfApi(endpoint=endpoint)
        self.timeout_s = timeout_s
        self.kept: cachetools.TLRUCache[bytes, str | None] = cachetools.TLRUCache(
            max_kept, ttu=lambda _key, name, now: now + (KNOWN_S if name != "" else UNKNOWN_S), timer=time.monotonic
        )  # digest -> name, None for a token the Hub refused, "" for no answer yet
        self.asking: dict[bytes, asyncio.Future[str | None]] = {}  # lookups under way, shared by the same token
        self.threads = ThreadPoolExecutor(lookups_at_once, thread_name_prefix="whoami")
        self.busy = 0  # lookups in a thread now (a hung one too): past `lookups_at_once`, no new one is started
        self.lookups_at_once = lookups_at_once
        self.per_address = parse(lookups_per_address)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def account_of(self, token: str, address: str) -> str | None:
        """The account `token` belongs to, or None (refused, no answer in time, or too many new tokens)."""
        digest = hashlib.sha256(token.encode()).digest()
        if (name := self.kept.get(digest, False)) is not False:
            return name or None
        if (asking := self.asking.get(digest)) is None:
            if self.busy >= self.lookups_at_once or not self.limiter.hit(self.per_address, address):
                return None  # no room to ask now: the caller is their address this time
            self.busy += 1  # until its thread is over, hung or not (`_done`)
            asking = self.asking[digest] = asyncio.ensure_future(self._ask(token, digest))
        try:
            return await asyncio.wait_for(asyncio.shield(asking), self.timeout_s)
        except TimeoutError:
            return None

    async def _ask(self, token: str, digest: bytes) -> str | None:
        lookup = asyncio.get_running_loop().run_in_executor(self.threads, self.api.whoami, token)
        lookup.add_done_callback(self._done)
        try:
            answer = await asyncio.wait_for(asyncio.shield(lookup), HUB_TIMEOUT_S)
            name = answer.get("name") if answer.get("type", "user") == "user" else None
            self.kept[digest] = name if isinstance(name, str) and name else None
        except HfHubHTTPError as error:  # 401: not a token the Hub knows; kept, so it is not asked again soon
            refused = error.response is not None and error.response.status_code in (401, 403)
            self.kept[digest] = None if refused else ""
            if not refused:
                logger.warning("The Hub could not say whose a token is (HTTP error); the caller counts as an address.")
        except Exception as error:  # timeout, network: asked again after UNKNOWN_S
            kind = type(error).__name__
            logger.warning("The Hub did not say whose a token is (%s); the caller counts as an address.", kind)
            self.kept[digest] = ""
        finally:
            del self.asking[digest]
        return self.kept.get(digest) or None

    def _done(self, _lookup: object) -> None:
        self.busy -= 1


def hub_calls_time_out() -> None:
    """huggingface_hub's shared HTTP client waits forever by default: a Hub that hangs would hold its thread for good
    (a whoami here, a Space's lookup in relay.py). Every call this process makes through it gives up instead."""
    get_session().timeout = HUB_TIMEOUT_S  # httpx takes a number for every phase
