"""The endpoint guard that both Spaces carry: one file, two identical copies."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ROOT

from guard import GET, Allowed, EndpointGuard


@pytest.mark.parametrize("module", ["guard.py", "photo_rules.py"])
def test_both_spaces_carry_the_same_copy(module):
    assert (ROOT / "private_space" / module).read_bytes() == (ROOT / "public_space" / module).read_bytes()


SETTINGS = {"fn_indices": [3], "api_name": "predict_api"}


def call(method: str, path: str, body: bytes = b"", headers=(), **settings) -> int:
    """One request through a guard in front of an app that answers 200; returns the status sent."""
    sent: list[dict] = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": list(headers)}
    asyncio.run(EndpointGuard(app, **SETTINGS, **settings)(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/gradio_api/queue/join", b'{"fn_index": 3}', 200),
        ("POST", "/gradio_api/queue/join/", b'{"fn_index": 3}', 200),
        ("POST", "//gradio_api//queue/join", b'{"fn_index": 4}', 403),
        ("POST", "/gradio_api/queue/join", b'{"fn_index": 4}', 403),
        ("POST", "/gradio_api/queue/join", b'{"fn_index": true}', 403),
        ("POST", "/gradio_api/queue/join", b'{"fn_index": 3, "fn_index": 4}', 403),
        ("POST", "/gradio_api/queue/join", b"not json", 403),
        ("POST", "/gradio_api/call/predict_api", b"{}", 200),
        ("GET", "/gradio_api/call/predict_api/abc123", b"", 200),
        ("POST", "/gradio_api/call/v2/predict_api", b"{}", 200),
        ("POST", "/gradio_api/call/predict_api/x/y", b"{}", 403),
        ("GET", "/gradio_api/call/other/abc123", b"", 403),
        ("POST", "/gradio_api/run/other", b"{}", 403),
        ("POST", "/gradio_api/upload", b"", 403),
        ("POST", "/gradio_api/component_server", b"{}", 403),
        ("DELETE", "/config", b"", 404),
        ("POST", "/gradio_api/cancel", b"{}", 200),
        ("GET", "/config", b"", 200),
    ],
)
def test_only_the_named_endpoint_passes(method, path, body, status):
    assert call(method, path, body) == status


def test_token_lock_accepts_both_header_spellings_and_nothing_else():
    def status(*headers: tuple[bytes, bytes], path: str = "/config") -> int:
        return call("GET", path, headers=headers, token="s3cret")

    assert status() == 401
    assert status((b"authorization", b"Bearer nope")) == 401
    assert status((b"authorization", b"Basic s3cret")) == 401
    assert status((b"authorization", b"Bearer s3cret")) == 200
    assert status((b"x-hf-authorization", b"Bearer s3cret")) == 200
    assert status(path="/gradio_api/startup-events") == 200  # Gradio's own launch() calls it bare


def test_oversized_bodies_are_refused():
    assert call("POST", "/gradio_api/queue/join", b'{"fn_index": 3, "data": ["0123456789"]}', max_body_bytes=10) == 413
    headers = [(b"content-length", b"999")]
    assert call("POST", "/gradio_api/call/predict_api", b"{}", headers=headers, max_body_bytes=10) == 413


def run_guarded(app, method: str = "GET", path: str = "/config", body: bytes = b"", **settings) -> list[dict]:
    """One request through a guard in front of `app`; returns the messages sent."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    asyncio.run(EndpointGuard(app, **SETTINGS, **settings)(scope, receive, send))
    return sent


def test_a_failing_app_gets_a_500_or_an_ended_stream_and_a_flood_of_failures_one_log_line(caplog):
    async def fails_at_once(scope, receive, send):
        raise RuntimeError("boom")

    async def fails_mid_stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        raise RuntimeError("boom")

    guard = EndpointGuard(fails_at_once, **SETTINGS)
    sent: list[dict] = []

    async def flood() -> None:
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        for _ in range(50):
            await guard(
                {"type": "http", "method": "GET", "path": "/config", "root_path": "", "headers": []}, receive, send
            )

    with caplog.at_level("WARNING", logger="guard"):
        asyncio.run(flood())
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [500] * 50
    assert [r.getMessage() for r in caplog.records] == ["GET /config failed: RuntimeError"]  # 49 more left out
    ended = run_guarded(fails_mid_stream)
    assert ended[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_data_that_does_not_fit_the_inputs_is_refused():
    def fits(data):
        return isinstance(data, list) and len(data) == 1

    assert call("POST", "/gradio_api/queue/join", b'{"fn_index": 3, "data": ["a"]}', check_data=fits) == 200
    assert call("POST", "/gradio_api/queue/join", b'{"fn_index": 3, "data": ["a", 2]}', check_data=fits) == 422
    assert call("POST", "/gradio_api/call/predict_api", b'{"data": 5}', check_data=fits) == 422
    assert call("POST", "/gradio_api/call/predict_api", b"[" * 100_000, check_data=fits) == 422


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/gradio_api/deep_link"),  # it writes a file of the session's values, for anyone
        ("GET", "/gradio_api/no-such-route"),
        ("GET", "/monitoring"),
        ("GET", "/openapi.json"),
        ("GET", "/gradio_api/heartbeat/abc123"),
        ("GET", "/gradio_api/queue/status"),  # the private app adds it; the guard alone does not
        ("POST", "/gradio_api/vibe-edit"),
        ("OPTIONS", "/config"),
        ("PUT", "/gradio_api/file=x"),
    ],
)
def test_a_route_no_entry_names_is_unknown(method, path):
    sent = run_guarded(lambda *_: pytest.fail("the app was reached"), method, path)
    assert (sent[0]["status"], sent[1]["body"]) == (404, b'{"detail":"Not Found"}')


def test_head_goes_where_get_goes_and_an_app_adds_its_own_routes():
    wait = Allowed(GET, "/backdrop/wait", "the wait figure")
    assert call("HEAD", "/") == call("HEAD", "/gradio_api/file=/tmp/x.png") == 200
    assert call("GET", "/backdrop/wait") == call("HEAD", "/backdrop/wait") == 404
    assert call("GET", "/backdrop/wait", allowed=[wait]) == call("HEAD", "/backdrop/wait", allowed=[wait]) == 200
    assert call("POST", "/backdrop/wait", allowed=[wait]) == 404
    assert call("GET", "/gradio_api/deep_link", token="s3cret") == 401  # the token lock comes before anything else
