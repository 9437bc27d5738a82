"""What both Spaces accept as a photo, checked from its header before any pixel is decoded, in the same sentences.

Both Spaces carry an identical copy of this file (a test keeps them identical): the public app refuses what the
backend would refuse, before decoding anything, and says so in the backend's words.
"""

from __future__ import annotations

from typing import IO

from PIL import Image, UnidentifiedImageError

FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}  # MPO: a camera JPEG with extra pictures (its first is the photo)
FORMAT_LIST = "JPEG, PNG or WebP"
NOT_AN_IMAGE = f"The upload is not an image. Please send a {FORMAT_LIST} photo."
DAMAGED = "The photo is truncated or damaged. Please send it again."


class PhotoError(ValueError):
    """A problem with the caller's photo, worded for the caller."""


def open_photo(source: str | IO[bytes], *, max_pixels: int) -> Image.Image:
    """Open a photo reading its header only; refuse (PhotoError) any format or size that neither Space decodes."""
    too_big = f"the limit is {max_pixels / 1e6:g} megapixels. Please send a smaller photo."
    try:
        photo = Image.open(source)
    except Image.DecompressionBombError:
        raise PhotoError(f"The photo has too many pixels: {too_big}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise PhotoError(NOT_AN_IMAGE) from None
    width, height = photo.size
    if photo.format not in FORMATS:
        photo.close()
        raise PhotoError(f"{photo.format or 'This'} images are not supported. Please send a {FORMAT_LIST} photo.")
    if width * height > max_pixels:
        photo.close()
        raise PhotoError(f"The photo is {width}×{height} pixels; {too_big}")
    return photo


def load_photo(photo: Image.Image, max_side: int) -> Image.Image:
    """Decode an opened photo. A JPEG over twice `max_side` is decoded at 1/2, 1/4 or 1/8 scale (never below that).

    Pillow's `draft` makes the JPEG decoder itself skip the detail: a 12000×8000 photo costs ~18 MB, not ~290 MB.
    """
    if photo.format in ("JPEG", "MPO") and max(photo.size) > 2 * max_side:
        scale = 2 * max_side / max(photo.size)
        photo.draft("RGB", (max(1, int(photo.width * scale)), max(1, int(photo.height * scale))))
    try:
        photo.load()
    except (OSError, SyntaxError, ValueError):
        raise PhotoError(DAMAGED) from None
    return photo
