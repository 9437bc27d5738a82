"""A visitor's photo as the relay sends it: the upload as it is when the backend can take it, else made so here.

Photos are read from the visitor's kept upload (files.py) when they are sent, a few at a time (`PhotoReader`),
and not held in between: a job waiting in line holds no photo in the front's memory (`Photo.bytes` reads it
again when the job must be sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
from pathlib import Path

import gradio as gr
from PIL import Image, ImageOps

from photo_rules import PhotoError, load_photo, open_photo
from relay import FAILED

UPLOAD_AGAIN = "Please upload your photo again: it is no longer on the server."

logger = logging.getLogger("backdrop")


def photo_bytes(path: Path, max_side: int, max_pixels: int, max_bytes: int) -> bytes:
    """The upload as it is when the backend can take it, else upright, flattened and downscaled (JPEG).

    It is refused from its header as the backend would refuse it, in the backend's words (photo_rules.py). The
    backend applies EXIF orientation itself, so only a photo that must be downscaled is decoded here, and a large
    JPEG at a fraction of its size. Any other failure is a sentence too, and one log line without the path.
    The same file always gives the same bytes (the backend seeds its pictures by them).
    """
    try:
        with path.open("rb") as source, open_photo(source, max_pixels=max_pixels) as photo:
            if max(photo.size) <= max_side and path.stat().st_size <= max_bytes:
                source.seek(0)
                return source.read()
            image = load_photo(photo, max_side)
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode != "RGB":  # transparency goes over white once small; palettes would resize poorly
                image = image.convert("RGBA" if image.has_transparency_data else "RGB")
            image.thumbnail((max_side, max_side), Image.LANCZOS)  # in place: no full-size copy is ever made
        flat = image if image.mode == "RGB" else Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
        buffer = io.BytesIO()
        flat.convert("RGB").save(buffer, format="JPEG", quality=92)
        return buffer.getvalue()
    except PhotoError as error:
        raise gr.Error(str(error), print_exception=False) from None
    except FileNotFoundError:  # removed meanwhile (Gradio's own clean-up, say)
        logger.warning("An upload was gone before it could be read.")
        raise gr.Error(UPLOAD_AGAIN, print_exception=False) from None
    except Exception as error:  # no traceback, and not the message: it could name the file
        logger.error("Reading an upload failed with %s.", type(error).__name__)
        raise gr.Error(FAILED, print_exception=False) from None


class PhotoReader:
    """Reads uploads into the photos to send (`photo_bytes`), `at_once` at a time: each decode can take up to 4 bytes
    per pixel."""

    def __init__(self, *, max_side: int, max_pixels: int, max_bytes: int, at_once: int = 2) -> None:
        self.limits = (max_side, max_pixels, max_bytes)
        self.decoding = asyncio.Semaphore(at_once)

    async def read(self, upload: Path) -> bytes:
        """The photo to send for `upload`.

        A cancelled request (Stop, or its visitor gone) is cancelled at once, but its decoding thread cannot be: it
        keeps its place among the few until it has really ended, so that Stop cannot start more decodes at once.
        """
        async with self.decoding:
            decode = asyncio.ensure_future(asyncio.to_thread(photo_bytes, upload, *self.limits))
            try:
                return await asyncio.shield(decode)
            finally:
                while not decode.done():  # cancelled: the thread runs on; a second cancel waits for it all the same
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({decode})
                if not decode.cancelled():
                    decode.exception()  # retrieved: a cancelled request's refusal is nobody's to see, nor to log

    async def photo(self, upload: Path) -> Photo:
        """The photo of `upload`, read once now (for its digest, and its first sending)."""
        return Photo(self, upload, await self.read(upload))


class Photo:
    """One request's photo: its digest, and its bytes for each time the job is sent (`bytes`). The first sending
    takes the bytes read at the start; any later one reads the upload again, so none are held in between."""

    def __init__(self, reader: PhotoReader, upload: Path, first: bytes) -> None:
        self.reader = reader
        self.upload = upload
        self.digest = hashlib.sha256(first).digest()
        self._first: bytes | None = first

    async def bytes(self) -> bytes:
        first, self._first = self._first, None
        return first if first is not None else await self.reader.read(self.upload)


def picture_suffix(data: bytes) -> str:
    """The file suffix for an image the backend sent (WebP today), so that it is served and saved as what it is."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    return ".png"
