"""Shared fixtures: tiny local models, free loopback ports, and the offline environment every test runs in.

Nothing here waits for a time: `wait_until` waits for a state (its timeout is only how long a broken feature takes
to fail), and the stand-in pipeline's latch holds a job where a test needs it held. The suite runs in parallel
processes (pytest-xdist), each with its own Gradio cache folder.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import importlib.util
import inspect
import io
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, NamedTuple

from hub_standin import HUB, StandInHub  # first: huggingface_hub reads HF_ENDPOINT once, when it is imported

# isort: split
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.client import Job
from gradio_client.exceptions import AppError
from PIL import Image

if TYPE_CHECKING:
    from standin import StandInPipeline

    from pool import Backends

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PHOTO = ROOT / "public_space" / "examples" / "astronaut.png"
TOKEN = "hf_relay-test-token-5b1f"  # the private app's token in tests that run both apps
API = "/predict_api"

# No test may reach the Hub or use a real token.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ.pop("HF_TOKEN", None)
# Gradio's upload cache, for this test process alone: the public app deletes files from it, and other test
# processes (xdist workers, other checkouts on this machine) must not see theirs go. Set before gradio is imported.
GRADIO_CACHE = tempfile.mkdtemp(prefix=f"backdrop-tests-{os.getenv('PYTEST_XDIST_WORKER', 'main')}-")
os.environ["GRADIO_TEMP_DIR"] = GRADIO_CACHE
atexit.register(shutil.rmtree, GRADIO_CACHE, ignore_errors=True)
WAIT_S = 60.0  # how long a test waits for a state before it fails: a broken feature, not a slow machine
# httpx builds an SSL context for every call that is not given one: the CA bundle read again, about 40 ms of CPU,
# which a test polling a route every 10 ms spends all the time. The test servers are plain http on loopback; every
# client here (gradio_client's `ssl_verify`, httpx's `verify`) shares this one context instead.
TLS = ssl.create_default_context()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first (marker `long`): one that starts near the end leaves the other process idle meanwhile."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny random-weight models with the maintainers' own script, once for all xdist workers."""
    shared = tmp_path_factory.getbasetemp()
    if os.getenv("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' base folders sit side by side in this run's folder
    out = shared / "tiny-models"
    with (shared / "tiny-models.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker builds; the others wait for it, then reuse
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "--out", str(out)]
            made = subprocess.run(command, capture_output=True, text=True, check=False)
            assert made.returncode == 0, made.stdout + made.stderr
            (out / "made.log").write_text(made.stdout + made.stderr)  # what it printed (tests/test_models.py)
            (out / "done").touch()
    return out


@pytest.fixture
def rate_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The fair share's rate window on the test's own clock: a window never turns over in the middle of a test,
    and it turns over the moment the test moves the clock (`rate_clock.now += seconds`)."""
    import limits.storage.memory
    import limits.strategies

    import visitors

    clock = Clock()
    clock.now = time.time()  # the limiter counts in seconds since the epoch
    for module in (limits.storage.memory, limits.strategies, visitors):
        monkeypatch.setattr(module, "time", SimpleNamespace(time=clock))
    return clock


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    """The stand-in Hub (hub_standin.py) for this test, with huggingface_hub's offline mode off for its length: the
    Hub calls it makes still end on loopback, here."""
    import huggingface_hub.constants

    assert HUB.url == huggingface_hub.constants.ENDPOINT, "huggingface_hub was imported before the stand-in"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    HUB.reset()
    yield HUB
    HUB.reset()


@pytest.fixture(autouse=True)
def _no_job_left_held() -> Iterator[None]:
    """After each test, every stand-in job still held goes on: a failing test leaves no thread waiting."""
    yield
    from standin import StandInPipeline

    StandInPipeline.release_everyone()


sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "private_space"), str(ROOT / "public_space")]


def load_app(space: str, fresh: bool = False) -> ModuleType:
    """Import `<space>/app.py` under a unique name: both Spaces call their entry module `app`. `fresh`: run it
    again, apart from the one the tests share, so that its constants read the environment as it is now."""
    name = f"{space}_app"
    if name in sys.modules and not fresh:
        return sys.modules[name]
    if fresh:  # its settings module too: the app takes its constants from there
        sys.modules.pop({"public_space": "front_settings", "private_space": "back_settings"}[space], None)
    spec = importlib.util.spec_from_file_location(name, ROOT / space / "app.py")
    module = importlib.util.module_from_spec(spec)
    if not fresh:
        sys.modules[name] = module  # registered before it runs, as an import does
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(demo, serve, **kwargs) -> Iterator[str]:
    """Serve `demo` with its Space's own `serve()` on a free loopback port; yield its URL; always close it.

    If `serve` starts a warm-up (the private app does, by default), this waits until the warm-up is over.
    """
    port = free_port()
    before = set(threading.enumerate())
    serve(demo, server_name="127.0.0.1", server_port=port, quiet=True, **kwargs)
    try:
        warm_ups = [t for t in threading.enumerate() if t not in before and t.name == "warm-up"]
        wait_until(lambda: not any(t.is_alive() for t in warm_ups), what="the warm-up to end")
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def kill(app) -> None:
    """Stop a served app (either Space's) the way a killed process stops: its open streams are cut, not waited for.
    (Gradio's `close()` alone waits up to 5 s for them, then leaves the server running until they end.)"""
    server = getattr(app.blocks, "server", None)
    if server is not None:
        server.force_exit = True
    app.close()


@pytest.fixture(scope="session")
def private_app() -> ModuleType:
    return load_app("private_space")


@pytest.fixture(scope="session")
def public_app() -> ModuleType:
    return load_app("public_space")


@dataclass
class Stack:
    front: str
    back: str
    standin: StandInPipeline
    front_app: object  # the public app (`app.Front`): a test reaches its parts (`files`) through it


class Clock:
    """A clock that stands still until the test moves it (`now += seconds`): for code whose time a test sets, so
    that nothing expires because the machine was slow, and something expires the moment the test says."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def stack(
    private_app, public_app, service_time: float = 0.0, front: dict | None = None, **backend_kwargs
) -> Iterator[Stack]:
    """The private app with a stand-in pipeline, warmed up, behind the public app; both on loopback."""
    from standin import StandInPipeline

    from pool import Backends

    standin = StandInPipeline(service_time=service_time)
    back_demo = private_app.create_app(standin, **backend_kwargs)
    with running(back_demo, private_app.serve, token=TOKEN, warm_up=True) as back:
        wait_until(lambda: standin.intervals)  # the warm-up went through: ETAs exist from here on
        front_made = front_app(public_app, Backends.connect([back], TOKEN), **(front or {}))
        with running(front_made, public_app.serve) as url:
            yield Stack(url, back, standin, front_made)


# Every test visitor comes from 127.0.0.1: fair share is off unless a test turns it on (tests/test_fair_share.py).
NO_FAIR_SHARE = {"max_jobs_per_visitor": 0, "visitor_rate": ""}
# Most tests count the jobs that reach the pipeline: the result cache is off unless a test turns it on
# (tests/test_result_cache.py).
NO_RESULT_CACHE = {"result_cache_entries": 0}


def front_app(public_app, backend, **kwargs):
    return public_app.create_app(backend, delete_cache=None, **{**NO_FAIR_SHARE, **NO_RESULT_CACHE, **kwargs})


def wait_until(condition, timeout: float = WAIT_S, what: str | Callable[[], str] | None = None) -> None:
    """Wait for `condition()` to hold; fail, saying what was awaited, if it never does (`what` may be a function:
    it is called then, to say how things stood).

    `timeout` is not a timing assumption: it is how long a test waits before calling the feature broken.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            awaited = what() if callable(what) else what
            raise AssertionError(f"waited {timeout:.0f} s for {awaited or _source(condition)}; it never happened")
        time.sleep(0.01)


def _source(condition) -> str:
    with contextlib.suppress(OSError, TypeError):
        return " ".join(inspect.getsource(condition).split())
    return repr(condition)


def visitor(url: str, headers: dict[str, str] | None = None, **options) -> Client:
    """A visitor of their own: each Client is one session, as each browser tab is (`options`: Client's own)."""
    return Client(url, token=False, verbose=False, headers=headers, ssl_verify=TLS, **options)


@pytest.fixture
def photo_b64() -> str:
    return base64.b64encode(EXAMPLE_PHOTO.read_bytes()).decode()


# What a test does as a caller, and reads of what it was told (one copy each, for every test file).


def submit(client: Client, category: str = "casual", gender: str = "female") -> Job:
    """The example photo sent by `client` (a `visitor`), as `gradio_client`'s submit: its job."""
    return client.submit(handle_file(str(EXAMPLE_PHOTO)), category, gender, api_name=API)


def statuses(job: Job) -> list[str]:
    """Every status line the job's caller was sent, in order."""
    return [output[2] for output in job.outputs()]


def latest(job: Job) -> str:
    """The last status line the job's caller was sent ("" before any)."""
    return (statuses(job) or [""])[-1]


def outcome(job: Job) -> str:
    """'Done', or the sentence the job's caller was told instead."""
    try:
        return "Done" if job.result(timeout=WAIT_S)[2].startswith("Done") else "not done"
    except AppError as error:
        return str(error)


def raw_outputs(raw: httpx.Client, path: str, category: str = "casual", gender: str = "male") -> list:
    """The outputs (overlay, result, status) of one run on an uploaded photo's server path, made the way the page
    makes it (queue join, then the stream); RuntimeError(its error) if it failed, RuntimeError("") if it never
    completed."""
    fn = next(dep["id"] for dep in raw.get("config").json()["dependencies"] if dep["api_name"] == "predict_api")
    session = uuid.uuid4().hex
    photo = {"path": path, "meta": {"_type": "gradio.FileData"}}
    body = {"data": [photo, category, gender], "fn_index": fn, "session_hash": session}
    raw.post("gradio_api/queue/join", json=body)
    with raw.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                output = message["output"]
                if output.get("error") or not message.get("success"):
                    raise RuntimeError(output.get("error") or "")
                return output["data"]
    raise RuntimeError("")


def raw_call(raw: httpx.Client, path: str, category: str = "casual", gender: str = "male") -> str:
    """`raw_outputs`' last status line, or the error it got."""
    try:
        return raw_outputs(raw, path, category, gender)[2]
    except RuntimeError as error:
        return str(error)


def png_b64(image: Image.Image, fmt: str = "PNG") -> str:
    """An image, encoded as `fmt` and base64: a photo as the private app takes it."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`×`height` pixels and holds (almost) none: what a decompression bomb looks like before
    any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


# Several backends behind one front (tests/test_backends.py, tests/test_metrics.py).


class LocalBackend(NamedTuple):
    url: str
    standin: StandInPipeline
    demo: object  # the private app's Blocks: `kill(demo)` stops it, mid-run if a test wants


@contextlib.contextmanager
def backend(private_app, service_time: float, port: int | None = None) -> Iterator[LocalBackend]:
    """A warmed-up private app with a stand-in of this service time (the backend then announces its job time)."""
    from standin import StandInPipeline

    standin = StandInPipeline(service_time=service_time)
    demo = private_app.create_app(standin)
    serve = private_app.serve
    if port is None:
        with running(demo, serve, token=TOKEN, warm_up=True) as url:
            assert standin.intervals, "the warm-up did not go through"
            yield LocalBackend(url, standin, demo)
        return
    serve(demo, token=TOKEN, warm_up=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        wait_until(lambda: standin.intervals)
        yield LocalBackend(f"http://127.0.0.1:{port}/", standin, demo)
    finally:
        kill(demo)


def pool(*urls: str, retry_after: float = 10.0) -> Backends:
    """The front's pool of these backends, each labelled by its place ("backend 1 of 2")."""
    from backends import Backend
    from pool import Backends

    return Backends([Backend(url, TOKEN, wake_timeout=10, retry_after=retry_after) for url in urls])


def queued(back: str) -> int:
    """Jobs waiting in this backend's queue (not started), as it says."""
    headers = {"x-hf-authorization": f"Bearer {TOKEN}"}
    return int(httpx.get(f"{back}gradio_api/queue/status", headers=headers, verify=TLS).json()["queue_size"])
