"""Finished results, kept so that a request already answered is answered again without joining the GPU queue.

The private app seeds each picture by photo, category and gender (`imaging.seed_for`), so one request to one build
of the backend always gives the same pictures. A result is kept under the request (the digest of the photo's
bytes as they are sent, category, gender) and a scope:
- the example photo (what "Use the example photo" uploads): one scope for everyone, as Gradio's cached examples;
- any other photo: its visitor (`visitors.visitor_of`). Someone's own photo's results go back to them alone,
  never to another visitor who sends the same bytes.
With the result goes the build id of the backend that made it (the `x-backdrop-build` header of its stream: see
private_space/identity.py). A kept result is given back only when a backend that is up says, asked at that
moment with a GET that runs nothing, that it is that build: once the backend is redeployed with other models or
settings, nothing the old one made is given back (a new run replaces it). At most `max_entries` results and
`max_bytes` of pictures are kept, the least recently used going first.

A kept answer comes after the same checks as a run (the request's inputs, the visitor's fair share and their own
upload): it holds the visitor's job slot only while it is answered, and counts as one of their photos for the
rate, but takes no place in the GPU queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator

from pool import Backends
from relay import Finished, Update

EVERYONE = "everyone"  # the scope of the example photo's results
AGAIN = "Done · this photo with these choices was made before, so here it is again at once."

ResultKey = tuple[bytes, str, str, str]  # photo digest, category, gender, scope


class Results:
    """The kept results of one public app, bounded by entries and by bytes (0 entries: keep none)."""

    def __init__(self, *, max_entries: int, max_bytes: int, example: bytes) -> None:
        """`example`: the example photo's bytes as this app sends them (its results are everyone's)."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.example = hashlib.sha256(example).digest()
        self.kept: OrderedDict[ResultKey, Finished] = OrderedDict()  # least recently used first
        self.bytes = 0

    def key(self, digest: bytes, category: str, gender: str, visitor: str) -> ResultKey:
        """What a result is kept under: the photo's digest, the choices, and whose it is (see the docstring)."""
        return digest, category, gender, EVERYONE if digest == self.example else visitor

    def may_answer(self, visitor: str) -> bool:
        """Whether a kept result could be `visitor`'s answer (theirs, or the example's), before their photo is read."""
        return any(scope in (visitor, EVERYONE) for *_, scope in self.kept)

    async def answer(self, pool: Backends, key: ResultKey) -> Finished | None:
        """The kept result for `key`, if a backend that is up now says it has the build that made it."""
        if (kept := self.kept.get(key)) is None or kept.build not in await builds_now(pool):
            return None
        if key in self.kept:  # (others may have pushed it out meanwhile)
            self.kept.move_to_end(key)
        return dataclasses.replace(kept, status=AGAIN)

    async def keeping(self, key: ResultKey, updates: AsyncIterator[Update]) -> AsyncIterator[Update]:
        """`updates` as they come, the result kept under `key` on its way to the visitor."""
        async with contextlib.aclosing(updates):
            async for update in updates:
                if isinstance(update, Finished):
                    self.keep(key, update)
                yield update

    def keep(self, key: ResultKey, finished: Finished) -> None:
        """Keep `finished` (without the photo it echoes) under `key`, if it says its build; evict to the bounds."""
        if finished.build is None or not self.max_entries:
            return
        self._drop(key)
        entry = dataclasses.replace(finished, image_b64="")
        self.kept[key] = entry
        self.bytes += _size(entry)
        while self.kept and (len(self.kept) > self.max_entries or self.bytes > self.max_bytes):
            self._drop(next(iter(self.kept)))

    def _drop(self, key: ResultKey) -> None:
        if (entry := self.kept.pop(key, None)) is not None:
            self.bytes -= _size(entry)


def _size(entry: Finished) -> int:
    return len(entry.overlay_b64) + len(entry.result_b64)


async def builds_now(pool: Backends) -> set[str]:
    """The build ids that the backends up now say they have (each asked once, all at once)."""
    said = await asyncio.gather(*(one.current_build() for one in pool.backends if not one.down))
    return {build for build in said if build}
