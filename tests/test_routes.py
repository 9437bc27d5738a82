"""Every route the running apps serve is let through by the guard with its reason, or refused on purpose.

A Gradio release that adds a route fails here until we name it: allowed (guard.ROUTES, or an app's own entries
passed to launch_guarded) or refused (REFUSED below, each with why). Then, with raw httpx against real servers,
what a refused route answers, and that it does nothing.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLE_PHOTO, GRADIO_CACHE, TOKEN, front_app, running, stack, visitor
from fastapi.routing import iter_route_contexts
from gradio_client import handle_file
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

import guard
from guard import Allowed, EndpointGuard

API = "predict_api"
NOT_FOUND = {"detail": "Not Found"}
BACK_AUTH = {"x-hf-authorization": f"Bearer {TOKEN}"}
# Routes of Gradio's that neither app lets through (as Starlette writes them, without a trailing slash).
REFUSED = {
    "/openapi.json": "FastAPI's list of every route: neither the page nor gradio_client reads it",
    "/gradio_api/openapi.json": "the API page's endpoints as OpenAPI: neither the page nor gradio_client reads it",
    "/login": "Gradio's own password sign-in (launch(auth=...)): neither app has one",
    "/logout": "its sign-out; where the public page shows Hugging Face sign-in, sign_in.py allows the OAuth one",
    "/gradio_api/user": "the password sign-in's user: none",
    "/gradio_api/login_check": "the password sign-in's check: none",
    "/gradio_api/token": "the password sign-in's token: none",
    "/gradio_api/app_id": "an id for Gradio's own hosting: neither the page nor gradio_client asks for it",
    "/gradio_api/deep_link": "writes a file of a session's values, for anyone (issue 21); the page offers no links",
    "/svelte/{path:path}": "Svelte for custom components: the page loads none",
    "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}": "custom components' files: none here",
    "/gradio_api/theme.css": "the theme a second time: the page reads /theme.css",
    "/robots.txt": "not needed: Gradio's answer off share links allows every crawler, as no robots.txt does",
    "/manifest.json": "for an installable page (launch(pwa=True)): ours is not",
    "/pwa_icon": "the same",
    "/pwa_icon/{size}": "the same",
    "/monitoring": "Gradio's monitoring dashboard: off (enable_monitoring=False); the API page copes without it",
    "/monitoring/summary": "the same",
    "/monitoring/{key}": "the same",
    "/gradio_api/dev/reload": "Gradio's reload mode (`gradio app.py`) only",
    "/gradio_api/runs": "run history: off (run_history=False)",
    "/gradio_api/proxy={url_path:path}": "gr.load's proxy: unused, and it has carried an owner's token (gradio-facts)",
    "/gradio_api/file/{path:path}": "the old form of file=: the page and gradio_client use file=",
    "/gradio_api/heartbeat/{session_hash}": "opened only where the config says connect_heartbeat: no app has (below)",
    "/gradio_api/stream/{event_id}": "streaming inputs: none here",
    "/gradio_api/stream/{event_id}/close": "the same",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8": "streaming outputs: none here",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}": "the same",
    "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file": "the same",
    "/gradio_api/run/{api_name}": "a run outside the queue (off Spaces api_open is on): no page or client uses it",
    "/gradio_api/api/{api_name}": "the same",
    "/gradio_api/component_server": "runs a component's own server function: none here has one the page needs",
    "/gradio_api/process_recording": "for recording inputs: the page has none",
    "/gradio_api/upload": "on the private app: it takes photos as base64 strings, never files",
    "/gradio_api/upload_progress": "the same",
    "/gradio_api/queue/status": "on the public app: only the relay asks it, of the private app (which allows it)",
    "/gradio_api/vibe-edit": "Gradio's AI editing mode (`gradio --vibe`): it rewrites the app",
    "/gradio_api/undo-vibe-edit": "the same",
    "/gradio_api/vibe-code": "the same",
    "/gradio_api/vibe-starter-queries": "the same",
}


def served(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route under `routes`: included routers and mounts too, each path as written."""
    for context in iter_route_contexts(routes):  # FastAPI's own view of included routers, with their prefixes
        route = context.route if context.path is None else context
        if isinstance(context.original_route, Mount):
            yield from served(context.original_route.routes, prefix + context.original_route.path)
        elif isinstance(context.original_route, WebSocketRoute):
            yield "WEBSOCKET", prefix + route.path
        elif isinstance(context.original_route, Route) or route.methods:
            for method in sorted(route.methods):
                yield method, prefix + route.path
        else:
            pytest.fail(f"a kind of route this test cannot read: {context.original_route!r}")


def guard_of(demo) -> EndpointGuard:
    """The guard in front of the running app (its outermost middleware but Starlette's own)."""
    layer = demo.blocks.server_app.middleware_stack
    while not isinstance(layer, EndpointGuard):
        layer = layer.app
    return layer


def example(path: str) -> str:
    """A request path for a route's path: `{api_name}` is our endpoint's name, any other parameter "x"."""
    return re.sub(r"\{[^}]+\}", "x", path.replace("{api_name}", API)).rstrip("/") or "/"


@pytest.fixture
def with_sign_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradio adds its real OAuth routes, as on a Space with `hf_oauth: true` (no request reaches the Hub here)."""
    import gradio.oauth

    monkeypatch.setattr(gradio.oauth, "get_space", lambda: "owner/front")
    for name in ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES"):
        monkeypatch.setattr(gradio.oauth, name, "stand-in")
    monkeypatch.setattr(gradio.oauth, "OPENID_PROVIDER_URL", "http://127.0.0.1:9")


def test_every_route_the_apps_serve_is_allowed_with_a_reason_or_refused_on_purpose(
    private_app, public_app, with_sign_in
):
    from standin import StandInPipeline

    seen: dict[str, list[tuple[str, str, Allowed | None]]] = {}  # app -> (method, path, the entry letting it in)
    back = private_app.create_app(StandInPipeline(service_time=0.0))
    with running(back, private_app.serve, token=TOKEN, warm_up=False) as back_url:
        assert httpx.get(f"{back_url}config", headers=BACK_AUTH).json()["connect_heartbeat"] is False
        seen["private"] = verdicts(back)
    for sign_in in (False, True):
        front = front_app(public_app, None, sign_in=sign_in)
        with running(front, public_app.serve) as front_url:
            assert httpx.get(f"{front_url}config").json()["connect_heartbeat"] is False
            seen[f"public, sign-in {sign_in}"] = verdicts(front)

    verdict = [
        (app, method, path.rstrip("/") or "/", entry) for app, routes in seen.items() for method, path, entry in routes
    ]
    unexplained = [
        f"{app}: {method} {path}" for app, method, path, entry in verdict if not entry and path not in REFUSED
    ]
    assert unexplained == [], "routes neither allowed (with a reason) nor refused on purpose (REFUSED)"
    assert set(REFUSED) == {path for _, _, path, entry in verdict if not entry}, "REFUSED names a route no app refuses"
    assert all(entry.reason for *_, entry in verdict if entry)
    used = {id(entry) for *_, entry in verdict if entry}
    assert [entry.path for entry in guard.ROUTES if id(entry) not in used] == [], "entries that name no route"
    allowed = {(app, method, path) for app, method, path, entry in verdict if entry}
    assert ("private", "GET", "/gradio_api/queue/status") in allowed  # the private app's own entry
    assert ("public, sign-in True", "GET", "/login/huggingface") in allowed  # the public app's, with sign-in
    assert ("public, sign-in False", "GET", "/logout") not in allowed  # Gradio's password sign-out


def verdicts(demo) -> list[tuple[str, str, Allowed | None]]:
    """Each route the running app serves, with the entry of its guard that lets it through (None: refused)."""
    endpoint_guard = guard_of(demo)
    routes = sorted(set(served(demo.blocks.server_app.routes)))
    assert ("POST", "/gradio_api/queue/join") in routes  # the walk reached the routes of Gradio's included router
    return [
        (method, path, endpoint_guard.entry_for(method, example(path)) if method != "WEBSOCKET" else None)
        for method, path in routes
    ]


def test_deep_link_is_unknown_and_writes_nothing_on_either_app(private_app, public_app):
    with stack(private_app, public_app) as s:
        front_caller, back_caller = visitor(s.front), visitor(s.back, headers=BACK_AUTH)
        assert front_caller.predict(handle_file(str(EXAMPLE_PHOTO)), "casual", "male", api_name=f"/{API}")
        photo_b64 = base64.b64encode(EXAMPLE_PHOTO.read_bytes()).decode()
        assert back_caller.predict(photo_b64, "casual", "male", api_name=f"/{API}")
        for url, caller, headers in ((s.front, front_caller, {}), (s.back, back_caller, BACK_AUTH)):
            query = {"session_hash": caller.session_hash}  # a session each app keeps: Gradio would write its values
            answer = httpx.get(f"{url}gradio_api/deep_link", params=query, headers=headers)
            assert (answer.status_code, answer.json()) == (404, NOT_FOUND)
    assert list(Path(GRADIO_CACHE).rglob("deep_links")) == []  # both apps' cache, in this test process


def test_a_made_up_route_is_unknown_and_the_token_lock_comes_first(private_app, public_app):
    with stack(private_app, public_app) as s:
        for path in ("gradio_api/no-such-route", "gradio_api/vibe-code", "monitoring", "openapi.json", "robots.txt"):
            answer = httpx.get(f"{s.front}{path}")
            assert (answer.status_code, answer.json()) == (404, NOT_FOUND), path
            assert httpx.get(f"{s.back}{path}").status_code == 401, path  # no token: refused before anything else
            assert httpx.get(f"{s.back}{path}", headers=BACK_AUTH).status_code == 404, path
        assert httpx.head(s.front).status_code == httpx.get(s.front).status_code == 200  # HEAD goes where GET goes
        assert httpx.request("OPTIONS", f"{s.front}config").status_code == 404
        assert httpx.get(f"{s.front}gradio_api/queue/status").status_code == 404  # only the private app allows it
        assert httpx.get(f"{s.back}gradio_api/queue/status", headers=BACK_AUTH).status_code == 200
