"""Backdrop's public Space: a thin relay that shows each visitor their live place, wait and progress in the GPU queue.

It holds no model: each request runs on the private Space (`BACKEND`) as that visitor's own job.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware
from starlette.requests import Request

from accounts import Accounts, hub_calls_time_out
from choices import CATEGORIES, GENDERS
from endpoint import NOT_CONFIGURED, Relay, relay_endpoint
from file_routes import EXAMPLE_ROUTE, FileRoutes
from files import Files
from front_metrics import FrontMetrics, NoMetrics
from front_settings import (
    ACCOUNT_MAX_JOBS,
    ACCOUNT_RATE,
    BACKEND,
    BACKEND_RETRY_S,
    BACKEND_WAKE_TIMEOUT,
    FILES_QUOTA_MB,
    HF_TOKEN,
    KEEP_FILES_S,
    MAX_JOBS_PER_VISITOR,
    MAX_MEGAPIXELS,
    MAX_SIDE,
    MAX_UPLOAD_MB,
    MAX_VISITORS,
    MAX_WAIT_S,
    METRICS_TOKEN,
    RESULT_CACHE_ENTRIES,
    RESULT_CACHE_MB,
    TRUSTED_PROXY_HOPS,
    VISITOR_FILES,
    VISITOR_FILES_MB,
    VISITOR_RATE,
)
from guard import GET, POST, UPLOAD, Allowed, Scope, launch_guarded
from photos import PhotoReader, photo_bytes
from pool import Backends
from relay import API_NAME  # the public endpoint is called as the backend's
from results import Results
from sign_in import ME_ROUTE, SIGN_IN_ROUTES, available, sign_in_button, who_js
from visitors import Callers, FairShare, Share, signed_in
from waiting import WAIT_ROUTE, ReadOnlyRoutes, WaitLine, poll_js
from wording import UNDER_WAY, about

EXAMPLE_PHOTO = Path(__file__).parent / "examples" / "astronaut.png"
# The page's routes besides Gradio's own (guard.ROUTES), each with why; with sign-in, SIGN_IN_ROUTES too.
ROUTES = (
    Allowed(POST, UPLOAD, "the visitor's photo (files.py holds each visitor to their share)"),
    Allowed(GET, "/gradio_api/upload_progress", "the page's progress bar while a photo uploads"),
    Allowed(GET, WAIT_ROUTE, "the wait before one runs, which the page polls (waiting.py)"),
    Allowed(GET, ME_ROUTE, "whom the page's own visitor is signed in as, and nothing else (sign_in.py)"),
    Allowed(GET, EXAMPLE_ROUTE, "the example photo: the button's icon, and what it uploads (files.py)"),
)

logger = logging.getLogger("backdrop")


@dataclass
class Front:
    """The public app: its page, and the parts `serve()` wires in around it."""

    blocks: gr.Blocks
    relay: Relay  # what the endpoint works with: the pool, the kept files, the fair share, the kept results...
    metrics: FrontMetrics | None  # the maintainer's figures, with a metrics token only
    metrics_token: str | None

    @property
    def files(self) -> Files:
        return self.relay.files

    def read_only_routes(self) -> dict[str, Callable[[Scope], object]]:
        """The page's read-only GETs: the wait before one runs, and who the page's own visitor is signed in as."""
        return {
            WAIT_ROUTE: lambda _scope: self.relay.wait_line.figure(),
            ME_ROUTE: lambda scope: {"name": signed_in(Request(scope))},
        }

    def close(self) -> None:
        self.blocks.close()


def create_app(
    pool: Backends | None,
    *,
    max_side: int = MAX_SIDE,
    max_megapixels: float = MAX_MEGAPIXELS,
    max_upload_mb: float = MAX_UPLOAD_MB,
    max_jobs_per_visitor: int = MAX_JOBS_PER_VISITOR,
    visitor_rate: str = VISITOR_RATE,
    account_max_jobs: int = ACCOUNT_MAX_JOBS,
    account_rate: str = ACCOUNT_RATE,
    max_wait_s: float = MAX_WAIT_S,
    trusted_proxy_hops: int = TRUSTED_PROXY_HOPS,
    keep_files_s: float = KEEP_FILES_S,
    files_quota_mb: float = FILES_QUOTA_MB,
    visitor_files_mb: float = VISITOR_FILES_MB,
    visitor_files: int = VISITOR_FILES,
    result_cache_entries: int = RESULT_CACHE_ENTRIES,
    result_cache_mb: float = RESULT_CACHE_MB,
    sign_in: bool | None = None,
    accounts: Accounts | None = None,
    metrics_token: str | None = METRICS_TOKEN,
    delete_cache: tuple[int, int] | None = None,
) -> Front:
    """Build the page around `pool` (None when unconfigured); serve it with `serve()`, which adds the guard.

    What stays on disk, and for how long, is files.py's alone (its docstring says it). `delete_cache` is Gradio's
    own sweep (every, older than; seconds), off: it removes files by age whatever their use, a photo being tried
    again or a result about to be downloaded included. Set it only as a backstop far longer than `keep_files_s`.
    `sign_in`: show "Sign in with Hugging Face" (default: where the Space provides OAuth, sign_in.py).
    `accounts`: how a caller's token names their account (default: the Hub's whoami, accounts.py).
    `metrics_token`: the maintainer's token for GET /metrics; without one there is no such route, and nothing is
    counted (front_metrics.py).
    """
    sign_in = available() if sign_in is None else sign_in
    photos = PhotoReader(max_side=max_side, max_pixels=int(max_megapixels * 1e6), max_bytes=int(max_upload_mb * 2**20))
    with gr.Blocks(title="Backdrop", delete_cache=delete_cache) as blocks:
        files = Files(
            blocks.GRADIO_CACHE,
            keep_s=keep_files_s,
            quota_bytes=int(files_quota_mb * 2**20),
            visitor_bytes=int(visitor_files_mb * 2**20),
            visitor_files=visitor_files,
            gradio_sets=blocks.temp_file_sets,
        )
        metrics = FrontMetrics(pool, kept_bytes=lambda: files.kept_bytes) if metrics_token else None
        relay = Relay(
            pool=pool,
            callers=Callers(trusted_proxy_hops, accounts or Accounts()),
            files=files,
            fair_share=FairShare(
                address=Share(max_jobs_per_visitor, visitor_rate),
                account=Share(account_max_jobs, account_rate),
                sign_in=sign_in,
            ),
            results=Results(  # the example's results are everyone's (results.py)
                max_entries=result_cache_entries,
                max_bytes=int(result_cache_mb * 2**20),
                example=photo_bytes(EXAMPLE_PHOTO, *photos.limits),
            ),
            photos=photos,
            wait_line=WaitLine(pool, max_wait_s=max_wait_s, about=about),
            metrics=metrics or NoMetrics(),
            sign_in=sign_in,
        )
        _page(blocks, relay_endpoint(relay), sign_in=sign_in, configured=pool is not None)
    blocks.queue(default_concurrency_limit=None)
    return Front(blocks, relay, metrics, metrics_token)


def _page(blocks: gr.Blocks, endpoint: Any, *, sign_in: bool, configured: bool) -> None:
    """The page's components and events, inside the Blocks: Run is the endpoint; every other event is the browser's."""
    gr.Markdown("# Backdrop\nUpload a portrait, pick a style, and get a new background behind the person.")
    if sign_in:  # a signed-in visitor's fair share is their own; the page says who they are (sign_in.py)
        with gr.Row():
            button = sign_in_button(size="sm", elem_id="sign-in", scale=0, min_width=200)
            who = gr.Markdown(elem_id="signed-in-as")
        blocks.load(None, js=who_js(), outputs=[button, who], api_visibility="private")  # browser-only
    if not configured:
        gr.Markdown(f"**{NOT_CONFIGURED}**", elem_id="not-configured")
    with gr.Row(equal_height=False):
        with gr.Column(min_width=280):
            photo = gr.Image(label="Photo", type="filepath", sources=["upload", "webcam"], elem_id="photo")
            example = gr.Button("Use the example photo", size="sm", icon=_example_icon())
            category = gr.Dropdown(list(CATEGORIES), value=next(iter(CATEGORIES)), label="Category")
            gender = gr.Radio(list(GENDERS), value=next(iter(GENDERS)), label="Gender")
            with gr.Row():
                run = gr.Button("Run", variant="primary", elem_id="run", min_width=80)
                stop = gr.Button("Stop", variant="stop", elem_id="stop", min_width=80)
            status = gr.Markdown(elem_id="status")
            gr.Markdown(elem_id="wait")  # how long the line is now: filled in by the browser (waiting.py)
        with gr.Column(min_width=280):
            overlay = gr.Image(label="Overlay", type="filepath", interactive=False, elem_id="overlay")
            result = gr.Image(label="Result", type="filepath", interactive=False, elem_id="result")
    job = run.click(
        endpoint,
        inputs=[photo, category, gender],
        outputs=[overlay, result, status],
        api_name=API_NAME,
        show_progress_on=[overlay, result],  # the status line shows the words; the bar goes on the images
        concurrency_limit=None,  # every visitor waits in the backend's queue, never in this one
        preprocess=False,  # the photo arrives as a checked upload path; photo_bytes checks it
        postprocess=False,  # the endpoint yields what Gradio sends: no thread hop per output at each update
    )
    stop.click(None, js="() => 'Stopped.'", outputs=[status], cancels=[job], api_visibility="private")
    # Browser-only: fetch the example and hand it to the photo input as a real upload.
    example.click(None, js=_upload_example_js(), api_visibility="private")
    blocks.load(None, js=poll_js("wait", "status", UNDER_WAY), api_visibility="private")  # browser-only: a GET


def _example_icon() -> dict[str, Any]:
    """The example as the button's icon, by the route that serves it (Gradio would show a file's server path)."""
    return {"path": EXAMPLE_PHOTO.name, "url": EXAMPLE_ROUTE, "meta": {"_type": "gradio.FileData"}}


def _upload_example_js() -> str:
    return f"""async () => {{
        const blob = await (await fetch("{EXAMPLE_ROUTE.lstrip("/")}")).blob();
        const input = document.querySelector("#photo input[type=file]");
        const files = new DataTransfer();
        files.items.add(new File([blob], "{EXAMPLE_PHOTO.name}", {{type: "image/png"}}));
        input.files = files.files;
        input.dispatchEvent(new Event("change", {{bubbles: true}}));
    }}"""


def serve(front: Front, **launch_kwargs: Any) -> None:
    """Launch the app behind the endpoint guard; returns once the server is up."""
    # Who a visitor is follows TRUSTED_PROXY_HOPS alone: uvicorn would otherwise take X-Forwarded-For from any
    # client on loopback as the address (an explicit FORWARDED_ALLOW_IPS still wins).
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    launch_kwargs.setdefault("max_threads", MAX_VISITORS)  # also Gradio's cap on events running at once
    # Gradio keeps every session's component values (~45 kB here) until this many newer sessions have come; the
    # page reads none of them back, so only the visitors being served need theirs. (Its default keeps 10,000.)
    launch_kwargs.setdefault("state_session_capacity", MAX_VISITORS)
    if importlib.util.find_spec("matplotlib") is None:  # Gradio tries to import it around every generator step
        sys.modules.setdefault("matplotlib", None)  # a failed import then costs nothing instead of a path search
    hub_calls_time_out()
    callers, example = front.relay.callers, EXAMPLE_PHOTO.read_bytes()
    files = Middleware(FileRoutes, files=front.files, callers=callers, example=example)
    read_only = Middleware(ReadOnlyRoutes, routes=front.read_only_routes())
    metrics = (front.metrics_token, front.metrics.render) if front.metrics else None
    launch_guarded(
        front.blocks,
        api_name=API_NAME,
        allowed=ROUTES + (SIGN_IN_ROUTES if front.blocks.expects_oauth else ()),
        max_file_size="20mb",
        middleware=[files, read_only],
        metrics=metrics,
        **launch_kwargs,
    )


def pool_from_env() -> Backends | None:
    """The configured backends, or None, logging which variable is missing (never its value)."""
    if not BACKEND:
        logger.error("BACKEND is not set: the page will say the service is not configured.")
        return None
    if not HF_TOKEN:
        logger.warning("HF_TOKEN is not set: requests to the backend carry no token.")
    return Backends.connect(BACKEND, HF_TOKEN, wake_timeout=BACKEND_WAKE_TIMEOUT, retry_after=BACKEND_RETRY_S)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its request lines carry the backend's address
    app = create_app(pool_from_env())
    serve(app)
    app.blocks.block_thread()
