"""Shared fixtures: tiny local models, free loopback ports, and the offline environment every test runs in."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PHOTO = ROOT / "public_space" / "examples" / "astronaut.png"

# No test may reach the Hub or use a real token.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ.pop("HF_TOKEN", None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny random-weight models once per session with the maintainers' own script."""
    out = tmp_path_factory.mktemp("tiny-models")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "--out", str(out)], check=True)
    return out


sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "private_space"), str(ROOT / "public_space")]


def load_app(space: str) -> ModuleType:
    """Import `<space>/app.py` under a unique name: both Spaces call their entry module `app`."""
    name = f"{space}_app"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / space / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(demo, serve, **kwargs) -> Iterator[str]:
    """Serve `demo` with its Space's own `serve()` on a free loopback port; yield its URL; always close it."""
    port = free_port()
    serve(demo, server_name="127.0.0.1", server_port=port, quiet=True, **kwargs)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="session")
def private_app() -> ModuleType:
    return load_app("private_space")


@pytest.fixture
def photo_b64() -> str:
    return base64.b64encode(EXAMPLE_PHOTO.read_bytes()).decode()
