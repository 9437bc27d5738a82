"""Who this backend is: a build id that changes whenever what decides its pictures changes.

The public app keeps finished results and answers a repeated request from them; it must never answer with a
picture an older deployment made. So every response of this app carries `x-backdrop-build`: a short hash of the
pipeline's settings (model ids or folders, steps, VAE, dtype), the app's own settings that change pictures, the
source of the modules that make them, and the versions of the libraries that run them. It is a hash: no model
name is ever in clear, and the header travels only behind the token lock (the guard answers 401 before this).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Iterable
from pathlib import Path

from guard import Message, Receive, Scope, Send

HEADER = "x-backdrop-build"
CODE = [
    Path(__file__).with_name(name) for name in ("app.py", "backdrop.py", "choices.py", "imaging.py", "photo_rules.py")
]
LIBRARIES = ("torch", "diffusers", "transformers", "pillow", "numpy")


def build_id(settings: Iterable[object], code: Iterable[Path] = CODE) -> str:
    """16 hex digits of SHA-256 over `settings` (their repr, in order), the `code` files and the library versions."""
    digest = hashlib.sha256()
    for part in [*map(repr, settings), *(_version(name) for name in LIBRARIES)]:
        digest.update(part.encode() + b"\0")
    for path in code:
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} absent"


class BuildHeader:
    """ASGI middleware (inside the guard): every response says the build id in `x-backdrop-build`."""

    def __init__(self, app: object, *, build: str) -> None:
        self.app = app
        self.header = (HEADER.encode(), build.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_build(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_build)
