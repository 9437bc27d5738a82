"""Gradio's internals that Backdrop leans on, each checked in the pinned version: docs/gradio-internals.md lists
them, with where each is used and why, in the same order as INTERNALS here.

No server: each check builds what it needs (a small Blocks and its queue) or reads a class, a function or a module.
A failure means an upgrade moved an internal: the doc's row says where it is used and what it is for.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import gradio as gr
import gradio.data_classes
import gradio.http_server
import gradio.oauth
import gradio.processing_utils
import gradio.queueing
import gradio.routes
import gradio.server_messages
import gradio.state_holder
import gradio.utils
import pytest
import spaces.zero.client
import spaces.zero.gradio
import uvicorn
from conftest import ROOT
from starlette.applications import Starlette

DOC = ROOT / "docs" / "gradio-internals.md"
INTERNALS: dict[str, Callable[[], None]] = {}  # the doc's first column -> its check


def internal(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(check: Callable[[], None]) -> Callable[[], None]:
        INTERNALS[name] = check
        return check

    return register


def echo(text: str) -> str:
    return text


@functools.cache
def built() -> gr.Blocks:
    """A Blocks as the apps build theirs: one `gr.api` endpoint, on the queue."""
    with gr.Blocks() as blocks:
        gr.api(echo, api_name="echo")
    blocks.queue(max_size=4, default_concurrency_limit=1)
    return blocks


def parameters(function: Callable) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def fields(model: type) -> set[str]:
    return set(model.model_fields)


# --- The private app: the GPU gate's estimates, the waiting figure (private_space/gpu_gate.py, app.py) ---


@internal("Blocks._queue")
def _() -> None:
    assert isinstance(built()._queue, gradio.queueing.Queue)


@internal("Queue.broadcast_estimations")
def _() -> None:
    assert parameters(gradio.queueing.Queue.broadcast_estimations) == ["concurrency_id", "after"]
    assert inspect.ismethod(built()._queue.broadcast_estimations)  # an instance attribute can shadow it


@internal("Queue.process_time_per_fn")
def _() -> None:
    assert isinstance(built()._queue.process_time_per_fn, dict)
    times = gradio.queueing.ProcessTime()  # what the gate stands in for: `avg_time` read, `add` called
    times.add(2.0)
    assert times.avg_time == 2.0


@internal("Queue.event_queue_per_concurrency_id")
def _() -> None:
    assert isinstance(built()._queue.event_queue_per_concurrency_id, dict)
    event_queue = gradio.queueing.EventQueue("id", 1)
    assert (event_queue.queue, event_queue.current_concurrency) == ([], 0)


@internal("Queue.send_message")
def _() -> None:
    assert parameters(gradio.queueing.Queue.send_message) == ["event", "event_message"]


@internal("gradio.server_messages.EstimationMessage")
def _() -> None:
    message = gradio.server_messages.EstimationMessage(rank=1, rank_eta=2.5, queue_size=3)
    assert (message.msg, message.rank, message.rank_eta, message.queue_size) == ("estimation", 1, 2.5, 3)


# --- Both apps: the guard, sessions, errors (guard.py, app.py) ---


@internal("BlockFunction._id")
def _() -> None:
    (fn,) = (fn for fn in built().fns.values() if fn.api_name == "echo")
    assert isinstance(fn._id, int)
    assert isinstance(fn.concurrency_id, str)
    assert [component.api_info()["type"] for component in fn.inputs] == ["string"]  # the guard's data check


@internal("Blocks.GRADIO_CACHE")
def _() -> None:
    assert Path(built().GRADIO_CACHE).is_absolute()


@internal("Blocks.state_holder")
def _() -> None:
    holder = built().state_holder
    assert (type(holder.session_data).__name__, holder.capacity) == ("OrderedDict", 10_000)
    assert "config_values" in vars(gradio.state_holder.SessionState(built()))
    assert "state_session_capacity" in parameters(gr.Blocks.launch)


@internal("gradio.utils.error_payload")
def _() -> None:
    payload = gradio.utils.error_payload(gr.Error("A sentence.", title="A title"), False)
    assert (payload["error"], payload["title"]) == ("A sentence.", "A title")


@internal("gradio.server_messages")
def _() -> None:
    kinds = {
        gradio.server_messages.EstimationMessage: ("estimation", {"rank", "rank_eta", "queue_size"}),
        gradio.server_messages.ProcessStartsMessage: ("process_starts", {"eta"}),
        gradio.server_messages.ProgressMessage: ("progress", {"progress_data"}),
        gradio.server_messages.ProcessCompletedMessage: ("process_completed", {"output", "success", "title"}),
        gradio.server_messages.UnexpectedErrorMessage: ("unexpected_error", {"message"}),
    }
    for model, (kind, names) in kinds.items():
        assert model.model_fields["msg"].default == kind
        assert names <= fields(model), model
    assert {"progress", "desc"} <= fields(gradio.server_messages.ProgressUnit)


# --- The public app: files, pictures, sign-in, the page (public_space/) ---


@internal("Blocks.temp_file_sets")
def _() -> None:
    sets = built().temp_file_sets
    assert isinstance(sets, list)
    assert all(isinstance(records, set) for records in sets)


@internal("gradio.processing_utils.save_bytes_to_cache")
def _() -> None:
    assert parameters(gradio.processing_utils.save_bytes_to_cache) == ["data", "file_name", "cache_dir"]


@internal("gradio.data_classes.ImageData")
def _() -> None:
    picture = gradio.data_classes.ImageData(path="/cache/result.webp", orig_name="result.webp").model_dump()
    assert (picture["path"], picture["orig_name"]) == ("/cache/result.webp", "result.webp")


@internal("gradio.data_classes.FileData.meta")
def _() -> None:
    assert gradio.data_classes.FileData(path="x.png").meta == {"_type": "gradio.FileData"}


@internal("Component.load_event_to_attach")
def _() -> None:
    with mock.patch("gradio.routes.attach_oauth"), gr.Blocks() as blocks:  # no OAuth routes: this is no Space
        button = gr.LoginButton()
        assert button.load_event_to_attach is not None  # Gradio would attach it as a server event...
        button.load_event_to_attach = None  # ... unless sign_in.py drops it, as here
    assert [fn for fn in blocks.fns.values() if fn.fn is not None] == []


@internal("Blocks.expects_oauth")
def _() -> None:
    assert built().expects_oauth is False


@internal("gradio.utils.MatplotlibBackendMananger")
def _() -> None:
    assert "import matplotlib" in inspect.getsource(gradio.utils.MatplotlibBackendMananger.__enter__)


@internal("x-gradio-user: app")
def _() -> None:
    assets = Path(gr.__file__).parent / "templates" / "frontend" / "assets"
    assert any(b'"x-gradio-user":`app`' in script.read_bytes() for script in assets.glob("*.js"))


# --- The tests (tests/) ---


@internal("Blocks.server.force_exit")
def _() -> None:
    assert "self.server = server" in inspect.getsource(gr.Blocks.launch)
    assert issubclass(gradio.http_server.Server, uvicorn.Server)
    assert uvicorn.Server(uvicorn.Config(app=None)).force_exit is False


@internal("Blocks.server_app")
def _() -> None:
    assert "self.server_app = self.app = App.create_app(" in inspect.getsource(gr.Blocks.launch)
    assert issubclass(gradio.routes.App, Starlette)  # its `routes` and `middleware_stack`


@internal("gradio.routes.attach_oauth")
def _() -> None:
    assert "attach_oauth(app)" in inspect.getsource(gradio.routes.App.create_app)
    assert gradio.routes.attach_oauth is gradio.oauth.attach_oauth


@internal("gradio.oauth settings")
def _() -> None:
    for name in ("get_space", "OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL"):
        assert hasattr(gradio.oauth, name), name


# --- The spaces package (ZeroGPU): the private app's refusals and the stand-in ---


@internal("spaces.zero.gradio.error")
def _() -> None:
    assert parameters(spaces.zero.gradio.error) == ["title", "message", "html"]
    refusal = spaces.zero.gradio.error("ZeroGPU queue timeout", spaces.zero.client.html_string("<b>x</b>", "x"), True)
    assert isinstance(refusal, gr.Error)
    assert (str(refusal.message), refusal.title, refusal.print_exception) == ("x", "ZeroGPU queue timeout", False)
    zero = Path(spaces.zero.__file__).parent  # its wrappers module imports CUDA-only parts of torch: read, not run
    sources = {name: (zero / name).read_text(encoding="utf-8") for name in ("client.py", "wrappers.py")}
    for name, source in sources.items():  # every error the package raises is titled "ZeroGPU …"
        titles = re.findall(r"\berror\(\s*\"([^\"]*)\"", source)
        assert titles, name
        assert all(title.startswith("ZeroGPU") for title in titles), (name, titles)
    assert '"ZeroGPU worker error"' in sources["wrappers.py"]  # app.py: our models failing there, not a refusal


@pytest.mark.parametrize("name", INTERNALS)
def test_each_internal_is_where_we_use_it(name: str) -> None:
    INTERNALS[name]()


def test_the_doc_lists_each_internal_checked_here_in_the_same_order() -> None:
    rows = re.findall(r"^\| `([^`]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert rows == list(INTERNALS)
