"""What the front keeps on disk, and for how long. This module alone decides it (Gradio's own sweep stays off).

The front keeps two kinds of files in Gradio's cache folder: visitors' uploads, and the overlays and results it
made for them (each saved with `save_result`, so its path is known from the start).

- A file stays at least `keep_s` after its last use, and goes once it has been unused that long. Each run on an
  upload uses it (so a visitor can try another style without uploading again); each fetch of a result uses it
  (its download button, a gradio_client download).
- Only the visitor who uploaded a photo can run it, or fetch it (anyone else is answered as for a missing file).
  Gradio stores uploads by content (`<cache>/<sha256>/<name>`), so two visitors' uploads of one photo are one
  file: each visitor holds a claim of their own on it, renewed by their own runs, and the file goes when the last
  claim has lapsed. A result is served to whoever has its path.
- A file counts for what it takes on disk (`Files.cost`): whole blocks of the file system, at least one, and one
  more for its folder. A 16-byte upload counts 8 kB, as `du` sees it.
- All kept files together stay within `quota_bytes`: past it, the least recently used go first, even within
  `keep_s` (a quota sized for the traffic makes that rare). A file in use never goes: an upload while a job runs
  on it, a result until its first fetch (at most `keep_s`). Only these can take the disk past the quota.
- One visitor's uploads together stay within `visitor_bytes` and `visitor_files`: an upload past either is
  refused with a sentence and leaves nothing behind, so one client can neither fill the disk nor push other
  visitors' photos out. The page shows the upload's 429 and its sentence; gradio_client, which would show HTTP
  jargon, gets a path that names no file, and the sentence at its run. Neither answer depends on what others keep.
- What a failed upload leaves in the folder (strays.py) is removed by the next sweep.

Gradio's records of its files (`Blocks.temp_file_sets`) lose each removed file too, or they would keep growing.
The requests that bring and fetch files reach this bookkeeping through file_routes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gradio.processing_utils import save_bytes_to_cache
from gradio_client.utils import is_http_url_like

import strays

REFUSED_FOLDER = "refused"  # never made (Gradio makes only content folders): what a refused upload's caller gets
SWEEP_EVERY_S = 30.0  # at most; a shorter keep_s is swept more often

logger = logging.getLogger("backdrop")


def too_many_uploads(wait_s: float) -> str:
    wait = math.ceil(wait_s - 1e-6)  # 500.0000001 s (float sums on the clock) is 500 s
    return f"You have uploaded too many photos in the last few minutes. Please try again in {wait} s."


@dataclass
class _Kept:
    cost: int  # what it takes on disk, as counted (Files.cost)
    used: float  # when it was last used (Files.clock)
    result: bool = False  # one of the front's pictures; else an upload
    claims: set[str] = field(default_factory=set)  # an upload's visitors whose claim has not lapsed
    jobs: int = 0  # jobs running on an upload
    unfetched: bool = False  # a result not fetched yet

    @property
    def in_use(self) -> bool:
        return self.jobs > 0 or self.unfetched


@dataclass
class _Share:
    """One visitor's claims (the least recently renewed first, with when) and what their files cost."""

    claims: OrderedDict[Path, float] = field(default_factory=OrderedDict)
    cost: int = 0


@dataclass(eq=False)
class Receipt:
    """An upload being received (`Files.receiving`)."""

    began: float
    stored: bool = False  # Gradio stored it all and answered with its paths


class Files:
    """This app's uploads and results in Gradio's cache folder: who may use each, and when each was last used.

    An upload, a run or a fetch costs the same however many files are kept: every claim is indexed by visitor
    and in the order it lapses, and claims lapse from the oldest on (`_lapse`) as time passes. Only the sweeps
    look further: at the files unused for `keep_s`, and after a failed upload at the whole folder (off the loop).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        keep_s: float,
        quota_bytes: int,
        visitor_bytes: int,
        visitor_files: int,
        gradio_sets: list[set[str]],
    ) -> None:
        """`visitor_files`: 0 for no bound on the number; `gradio_sets` is `Blocks.temp_file_sets` itself (the list,
        which Gradio extends as components are made)."""
        self.given_dir = str(cache_dir)  # Gradio's records name files under the folder as it was given ...
        self.cache_dir = Path(cache_dir).resolve()  # ... and these, under the folder itself
        self.keep_s = keep_s
        self.quota_bytes = quota_bytes
        self.visitor_bytes = visitor_bytes
        self.visitor_files = visitor_files
        self.gradio_sets = gradio_sets
        self.block = _block_size(self.cache_dir)
        self.kept: OrderedDict[Path, _Kept] = OrderedDict()  # least recently used first
        self.kept_bytes = 0  # their cost (Files.cost), which the metrics show
        self.shares: dict[str, _Share] = {}  # visitors with a claim -> their claims
        self.claims: OrderedDict[tuple[str, Path], float] = OrderedDict()  # every claim, the oldest first
        self.refused: dict[str, float] = {}  # visitors refused an upload -> when (forgotten after keep_s)
        self.receipts: set[Receipt] = set()  # uploads being received now
        self.strays: dict[Path, float] = {}  # files no one keeps (strays.py) -> when first seen
        self.look_for_strays = False  # an upload failed: it may have left some
        self.peak_bytes = 0  # the most ever kept at once (benchmarks read it)
        self.clock = time.monotonic  # seconds; tests may set their own

    def cost(self, path: Path) -> int:
        """What a file takes on disk, counted: its blocks (at least one), and a block for its folder (Gradio gives
        each content a folder of its own)."""
        stat = path.stat()
        blocks = max(1, -(-stat.st_size // self.block), -(-stat.st_blocks * 512 // self.block))
        return (blocks + 1) * self.block

    # Uploads

    def uploaded(self, paths: Iterable[str], visitor: str) -> str | None:
        """Note `visitor`'s new uploads; None, or the sentence that refuses them all (they are removed, unless
        another visitor keeps the same photo)."""
        now = self._lapse()
        new = list(dict.fromkeys(path for path in map(self._inside, paths) if path is not None and path.is_file()))
        share = self.shares.get(visitor, _Share())
        adding = [path for path in new if path not in share.claims]
        cost = share.cost + sum(kept.cost if (kept := self.kept.get(path)) else self.cost(path) for path in adding)
        too_many = self.visitor_files and len(share.claims) + len(adding) > self.visitor_files
        if too_many or cost > self.visitor_bytes:
            for path in adding:
                if path not in self.kept:
                    self._remove(path)
            self.refused[visitor] = now
            return self._too_many(visitor, now)
        for path in new:
            self._claim(visitor, path, self._add(path, now), now)
        self._make_room()
        return None

    def refusal(self, visitor: str) -> str | None:
        """The sentence that refused `visitor`'s latest upload, if one was refused within `keep_s`."""
        now = self._lapse()
        refused = self.refused.get(visitor)
        return self._too_many(visitor, now) if refused is not None and now - refused < self.keep_s else None

    def placeholder(self, path: str) -> str:
        """What a refused upload's caller gets instead of its path: a path that names no file, whoever keeps what."""
        return os.path.join(self.given_dir, REFUSED_FOLDER, os.path.basename(path))

    def _too_many(self, visitor: str, now: float) -> str:
        """Too many uploads, and how long until the oldest of the visitor's claims lapses."""
        share = self.shares.get(visitor)
        oldest = next(iter(share.claims.values())) if share else now
        return too_many_uploads(max(1.0, oldest + self.keep_s - now))

    @contextlib.contextmanager
    def using(self, path: str, visitor: str) -> Iterator[Path | None]:
        """`visitor`'s upload at `path`, kept for the length of the block and `keep_s` after it; None when they
        hold no claim on it (it lapsed, or they never uploaded it), whoever else keeps the same photo."""
        now = self._lapse()
        inside = self._inside(path)
        kept = self.kept.get(inside) if inside is not None else None
        if kept is None or visitor not in kept.claims:
            yield None
            return
        kept.jobs += 1
        self._claim(visitor, inside, kept, now)
        try:
            yield inside
        finally:
            kept.jobs -= 1
            if self.kept.get(inside) is kept:
                self._claim(visitor, inside, kept, self._lapse())

    @contextlib.contextmanager
    def receiving(self) -> Iterator[Receipt]:
        """An upload being received: what Gradio writes for it meanwhile is no stray. One that fails (the client
        gone, a file name refused) can leave files behind: the next sweep looks for them (strays.py)."""
        receipt = Receipt(began=self.clock())
        self.receipts.add(receipt)
        try:
            yield receipt
        finally:
            self.receipts.discard(receipt)
            self.look_for_strays |= not receipt.stored

    # Results

    def save_result(self, data: bytes, name: str) -> Path:
        """Write a result where Gradio caches it (Gradio finds it there and serves it as it is); it is in use until
        its first fetch."""
        path = Path(save_bytes_to_cache(data, name, self.given_dir)).resolve()
        kept = self._add(path, self.clock())
        kept.result = kept.unfetched = True
        self._make_room()
        return path

    def servable(self, path: str, visitor: str) -> bool:
        """Whether a file is served to `visitor`. In the cache folder: a result to anyone, an upload to its visitors
        only (to anyone else it is as missing), and nothing else. Elsewhere Gradio's own rules decide (it serves
        its static files so: the sign-in button's icon), but no URL: Gradio would fetch it for the caller."""
        self._lapse()
        inside = self._inside(path)
        if inside is None:
            return not is_http_url_like(path)
        kept = self.kept.get(inside)
        return kept is not None and (kept.result or visitor in kept.claims)

    def fetched(self, path: str) -> None:
        """A file was served: a result's fetch is a use of it (an upload's preview is not: only runs renew it)."""
        inside = self._inside(path)
        kept = self.kept.get(inside) if inside is not None else None
        if kept is not None and kept.result:
            kept.unfetched = False
            self._touch(inside, kept, self.clock())

    # Keeping within bounds

    def sweep(self) -> None:
        """Remove the files unused for `keep_s` (its last claim lapsed, or a result not fetched again), but for an
        upload a job still runs on."""
        expired = self._lapse() - self.keep_s
        self.refused = {visitor: when for visitor, when in self.refused.items() if when > expired}
        stale = []
        for path, kept in self.kept.items():
            if kept.used > expired:
                break  # least recently used first: the rest are newer
            if not kept.jobs:
                stale.append(path)
        for path in stale:
            self._drop(path)

    def sweep_strays(self, found: list[Path]) -> None:
        """Remove the files no one keeps (`strays.unknown`) that no upload being received can be writing: seen
        before the oldest of those began, or `keep_s` ago."""
        now = self.clock()
        oldest = min((receipt.began for receipt in self.receipts), default=math.inf)
        seen = {path: self.strays.get(path, now) for path in found if path not in self.kept}
        for path, when in list(seen.items()):
            if when < oldest or now - when >= self.keep_s:
                self._remove(path)
                del seen[path]
        self.strays = seen
        self.look_for_strays = bool(seen)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_EVERY_S, max(0.2, self.keep_s / 4)))
            try:
                self.sweep()
                if self.look_for_strays:  # listing the folder takes a while: not in the event loop
                    self.sweep_strays(await asyncio.to_thread(strays.unknown, self.cache_dir, self.kept))
            except Exception as error:  # the next sweep tries again; the log names no file
                logger.error("Sweeping the kept files failed with %s.", type(error).__name__)

    def _lapse(self) -> float:
        """Lapse the claims unused for `keep_s`, the oldest first; the time now."""
        now = self.clock()
        while self.claims:
            (visitor, path), when = next(iter(self.claims.items()))
            if now - when < self.keep_s:
                break
            self._unclaim(visitor, path)
        return now

    def _claim(self, visitor: str, path: Path, kept: _Kept, now: float) -> None:
        """Give `visitor` a claim on an upload, or renew theirs."""
        share = self.shares.setdefault(visitor, _Share())
        if path not in share.claims:
            share.cost += kept.cost
            kept.claims.add(visitor)
        share.claims[path] = self.claims[visitor, path] = now
        share.claims.move_to_end(path)
        self.claims.move_to_end((visitor, path))
        self._touch(path, kept, now)

    def _unclaim(self, visitor: str, path: Path) -> None:
        share = self.shares[visitor]
        del share.claims[path], self.claims[visitor, path]
        kept = self.kept[path]
        share.cost -= kept.cost
        kept.claims.discard(visitor)
        if not share.claims:
            del self.shares[visitor]

    def _add(self, path: Path, now: float) -> _Kept:
        kept = self.kept.get(path)
        if kept is None:
            kept = self.kept[path] = _Kept(cost=self.cost(path), used=now)
            self.kept_bytes += kept.cost
            self.peak_bytes = max(self.peak_bytes, self.kept_bytes)
        self._touch(path, kept, now)
        return kept

    def _touch(self, path: Path, kept: _Kept, now: float) -> None:
        kept.used = now
        self.kept.move_to_end(path)

    def _make_room(self) -> None:
        """Remove the least recently used files not in use until all kept files fit the quota."""
        excess, going = self.kept_bytes - self.quota_bytes, []
        for path, kept in self.kept.items():
            if excess <= 0:
                break
            if not kept.in_use:
                going.append(path)
                excess -= kept.cost
        for path in going:
            self._drop(path)

    def _drop(self, path: Path) -> None:
        for visitor in list(self.kept[path].claims):
            self._unclaim(visitor, path)
        self.kept_bytes -= self.kept.pop(path).cost
        self._remove(path)

    def _remove(self, path: Path) -> None:
        """Delete a file (or an empty content folder) in the cache folder, and first Gradio's records of it (by any
        name Gradio gives it)."""
        given = os.path.join(self.given_dir, path.relative_to(self.cache_dir))
        names = {str(path), given, os.path.abspath(given)}
        for records in self.gradio_sets:
            records.difference_update(names)
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
                return
            path.unlink(missing_ok=True)
            if path.parent != self.cache_dir:
                path.parent.rmdir()  # its content folder, once empty

    def _inside(self, path: str) -> Path | None:
        with contextlib.suppress(OSError, ValueError):
            resolved = Path(path).resolve()
            if resolved.is_relative_to(self.cache_dir):
                return resolved
        return None


def _block_size(folder: Path) -> int:
    """The file system's allocation unit where `folder` is (or will be: Gradio makes it on the first upload)."""
    for place in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            stat = os.statvfs(place)
            return stat.f_frsize or stat.f_bsize or 4096
    return 4096
