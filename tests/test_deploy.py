"""scripts/deploy.py, offline: its --dry-run plans, its refusals, its wait-and-report logic, a whole backend
deploy (up to the smoke test) and a rolling one against a stand-in of the few Hub routes it calls, served on
loopback, and `deploy.py status` against loopback servers that serve /metrics text as the apps write it.

The command-line tests run a copy of the two deploy scripts inside a small repo-shaped folder, in a subprocess
whose HF_ENDPOINT points at the stand-in: the code path a maintainer runs, with the stand-in recording every
request, so "nothing was sent" is checked, not assumed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import png_b64
from huggingface_hub import SpaceRuntime
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))

import deploy  # noqa: E402
import deploy_plan  # noqa: E402
import deploy_status  # noqa: E402

WRITE = "hf_WRITEtokenDoNotPrint0123456789"
LOCK = "lockSECRETdoNotPrint0123456789"
READ = "hf_READtokenDoNotPrint0123456789"
SPACE = "me/backdrop-gpu"
BACKEND_STEPS = [
    "space_info",
    "create_repo",
    *["add_space_variable"] * 6,
    "add_space_secret",
    "request_space_hardware",
    "upload_folder",
    "wait_until_running",
    "Client.predict",
]


# --- a stand-in for the Hub routes the script calls -------------------------------------------------------------


class Hub(ThreadingHTTPServer):
    """Each Space's runtime walks through `stages[space]` if set, else the shared `stages` (the last one repeats).
    A stage may name its commit: "RUNNING@old" (the commit before the last upload) or "RUNNING@new" (the last)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.spaces: dict[str, dict] = {}
        self.stages: list[str] | dict[str, list[str]] = ["RUNNING"]
        self.logs: list[str] = []
        self.requests: list[tuple[str, str, str | None, bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def routes(self) -> list[str]:
        return [f"{method} {path}" for method, path, _, _ in self.requests]

    def body(self, route: str) -> list[bytes]:
        return [body for method, path, _, body in self.requests if f"{method} {path}" == route]

    def add(self, space: str, *, private: bool = True) -> None:
        """An existing Space, with an app already deployed at commit "0" * 40."""
        self.spaces[space] = {"private": private, "files": {".gitattributes", "app.py"}, "sha": "0" * 40}

    def runtime(self, space: str) -> dict:
        stages = self.stages.get(space, ["RUNNING"]) if isinstance(self.stages, dict) else self.stages
        stage, _, commit = (stages.pop(0) if len(stages) > 1 else stages[0]).partition("@")
        record, runtime = self.spaces[space], {"stage": stage, "hardware": {"current": None, "requested": "t4-small"}}
        if commit:
            runtime["sha"] = record["sha"] if commit == "new" else record.get("previous", "f" * 40)
        return runtime

    def commit(self, space: str) -> str:
        record = self.spaces[space]
        record["previous"] = record["sha"]
        record["sha"] = hashlib.sha1(f"{space} {record['previous']}".encode()).hexdigest()
        return record["sha"]


class HubHandler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _send(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        hub, path = self.server, urlsplit(self.path).path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub.requests.append((method, path, self.headers.get("authorization"), body))
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            space = f"{payload['organization']}/{payload['name']}"
            if space in hub.spaces:
                return self._send(409, {"error": "You already created this repo", "url": f"{hub.url}/spaces/{space}"})
            hub.spaces[space] = {"private": payload.get("visibility") == "private", "files": {".gitattributes"}}
            hub.spaces[space]["sha"] = "0" * 40
            return self._send(200, {"url": f"{hub.url}/spaces/{space}"})
        if method == "POST" and path == "/api/validate-yaml":  # upload_folder checks README.md's front matter
            return self._send(200, {"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/spaces/([^/]+/[^/]+)(?:/(\w+))?(?:/(\w+))?", path)
        if match is None or match[1] not in hub.spaces:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        space, route, rest = match[1], match[2], match[3]
        record = hub.spaces[space]
        if route is None:
            return self._send(200, {"id": space, "private": record["private"], "sha": record["sha"]})
        if route == "runtime":
            return self._send(200, hub.runtime(space))
        if route == "hardware":
            return self._send(200, {"stage": "BUILDING", "hardware": {"current": None, "requested": "t4-small"}})
        if route in ("variables", "secrets"):
            return self._send(200, {})
        if route == "tree":
            files = [{"type": "file", "path": name, "size": 1, "oid": "0" * 40} for name in sorted(record["files"])]
            return self._send(200, files)
        if route == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return self._send(200, {"files": modes})
        if route == "commit":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    record["files"].add(item["value"]["path"])
                elif item["key"] == "deletedFile":
                    record["files"].discard(item["value"]["path"])
            oid = hub.commit(space)
            return self._send(200, {"commitUrl": f"{hub.url}/spaces/{space}/commit/{oid}", "commitOid": oid})
        if route == "logs":
            events = [{"data": f"{line}\n", "timestamp": "2020-01-01T00:00:00Z"} for line in hub.logs]
            stream = "".join(f"data: {json.dumps(event)}\n\n" for event in events).encode()
            return self._send(200, stream, {"Content-Type": "text/event-stream"})
        return self._send(404, {"error": f"no stand-in for {method} {path} ({rest})"})


@pytest.fixture
def hub() -> Iterator[Hub]:
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repo-shaped folder: the two deploy scripts, and two small Space folders to upload."""
    (tmp_path / "scripts").mkdir()
    for name in ("deploy.py", "deploy_plan.py", "settings_tables.py"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    for space, settings in (("private_space", "back_settings.py"), ("public_space", "front_settings.py")):
        (tmp_path / space / "__pycache__").mkdir(parents=True)
        for name in ("environment.py", settings):  # where deploy.py takes its defaults
            shutil.copy(ROOT / space / name, tmp_path / space / name)
        (tmp_path / space / "app.py").write_text("print('hello')\n")
        (tmp_path / space / "README.md").write_text("---\nsdk: gradio\n---\n")
        (tmp_path / space / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0compiled")
    (tmp_path / "private_space" / "helpers").mkdir()
    (tmp_path / "private_space" / "helpers" / "imaging.py").write_text("X = 1\n")
    (tmp_path / "public_space" / "examples").mkdir()
    shutil.copy(ROOT / "public_space" / "examples" / "astronaut.png", tmp_path / "public_space" / "examples")
    return tmp_path


def run_deploy(repo: Path, hub: Hub, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the copied deploy.py with a clean Hugging Face environment pointed at the stand-in."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "BACKEND"))}
    base |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(repo / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    base |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_TOKEN": WRITE, **env}
    command = [sys.executable, str(repo / "scripts" / "deploy.py"), *args]
    return subprocess.run(
        command, env=base, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL, check=False
    )


def steps(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"\[\d+\] ", line)]


def step_names(stdout: str) -> list[str]:
    return [re.match(r"\[\d+\] ([\w.]+)\(", line)[1] for line in steps(stdout)]


def assert_no_secret(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout
        assert secret not in result.stderr


# --- --dry-run plans ----------------------------------------------------------------------------------------------


def test_backend_dry_run_prints_every_call_in_order_masked_and_sends_nothing(repo: Path, hub: Hub) -> None:
    options = ["--hardware", "zero-a10g", "--sleep-time", "600", "--steps", "2", "--background-model", "me/sd"]
    result = run_deploy(repo, hub, "backend", "--space", SPACE, "--dry-run", *options, BACKEND_TOKEN=LOCK)

    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    assert step_names(result.stdout) == BACKEND_STEPS
    plan = "\n".join(steps(result.stdout))
    assert "create_repo(repo_id='me/backdrop-gpu', repo_type='space', space_sdk='gradio', private=True" in plan
    for key, value in [
        ("SEGMENTATION_MODEL", "mattmdjaga/segformer_b2_clothes"),
        ("BACKGROUND_MODEL", "me/sd"),
        ("BACKGROUND_STEPS", "2"),
        ("QUEUE_MAX_SIZE", "32"),
        ("GPU_DURATION_S", "30"),
        ("GPU_CONCURRENCY", "2"),  # zero-a10g: ZeroGPU runs each call on a GPU of its own
    ]:
        assert f"key='{key}', value='{value}')" in plan
    assert "add_space_secret(repo_id='me/backdrop-gpu', key='BACKEND_TOKEN', value=***)" in plan
    assert "request_space_hardware(repo_id='me/backdrop-gpu', hardware='zero-a10g', sleep_time=600)" in plan
    assert "delete_patterns='*'" in plan
    assert "'*__pycache__*'" in plan
    assert "Client.predict(space='me/backdrop-gpu', token='***'" in plan
    files = "README.md, app.py, back_settings.py, environment.py, helpers/imaging.py"
    assert f"5 files from private_space/: {files}" in result.stdout
    assert_no_secret(result, WRITE, LOCK)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], None),  # GPU hardware (t4-small): the full VAE
        (["--hardware", "cpu-basic"], "madebyollin/taesd"),
        (["--hardware", "cpu-upgrade", "--vae-model", ""], None),
        (["--vae-model", "me/taesd"], "me/taesd"),
    ],
)
def test_backend_sets_vae_model_on_cpu_hardware_or_when_asked_to(
    repo: Path, hub: Hub, options: list[str], expected: str | None
) -> None:
    result = run_deploy(repo, hub, "backend", "--space", SPACE, "--dry-run", *options, BACKEND_TOKEN=LOCK)
    assert result.returncode == 0, result.stderr
    plan = "\n".join(steps(result.stdout))
    if expected is None:
        assert "VAE_MODEL" not in plan
    else:
        assert f"key='VAE_MODEL', value='{expected}')" in plan


def test_frontend_dry_run_prints_every_call_in_order_masked_and_sends_nothing(repo: Path, hub: Hub) -> None:
    result = run_deploy(
        repo, hub, "frontend", "--space", "me/backdrop", "--backend", SPACE, "--dry-run", BACKEND_READ_TOKEN=READ
    )

    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    assert step_names(result.stdout) == [
        "create_repo",
        *["add_space_variable"] * 3,
        "add_space_secret",
        "request_space_hardware",
        "upload_folder",
        "wait_until_running",
        "Client.predict",
    ]
    plan = "\n".join(steps(result.stdout))
    assert "create_repo(repo_id='me/backdrop', repo_type='space', space_sdk='gradio', private=False" in plan
    assert "add_space_variable(repo_id='me/backdrop', key='BACKEND', value='me/backdrop-gpu')" in plan
    assert "add_space_variable(repo_id='me/backdrop', key='BACKEND_WAKE_TIMEOUT', value='180')" in plan
    # On Spaces, Hugging Face's proxy appends the visitor's address to X-Forwarded-For: one hop to trust
    assert "add_space_variable(repo_id='me/backdrop', key='TRUSTED_PROXY_HOPS', value='1')" in plan
    assert "add_space_secret(repo_id='me/backdrop', key='HF_TOKEN', value=***)" in plan
    assert "request_space_hardware(repo_id='me/backdrop', hardware='cpu-basic')" in plan
    assert "Client.predict(space='me/backdrop', token=False" in plan
    assert_no_secret(result, WRITE, READ)


def test_frontend_dry_run_with_several_backends_sets_the_comma_joined_list(repo: Path, hub: Hub) -> None:
    backends = ["--backend", "me/gpu-1", "--backend", "me/gpu-2", "--backend", "https://gpu-3.example.org"]
    result = run_deploy(
        repo, hub, "frontend", "--space", "me/backdrop", *backends, "--dry-run", BACKEND_READ_TOKEN=READ
    )

    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    plan = "\n".join(steps(result.stdout))
    value = "me/gpu-1,me/gpu-2,https://gpu-3.example.org"
    assert f"add_space_variable(repo_id='me/backdrop', key='BACKEND', value='{value}')" in plan
    assert step_names(result.stdout).count("add_space_variable") == 3
    assert_no_secret(result, WRITE, READ)


@pytest.mark.parametrize("spaces", [["me/gpu-1", "me/gpu-2"], ["me/gpu-1", "me/gpu-2", "me/gpu-3"]])
def test_rolling_dry_run_checks_every_space_first_then_deploys_one_after_the_other(
    repo: Path, hub: Hub, spaces: list[str]
) -> None:
    named = [option for space in spaces for option in ("--space", space)]
    result = run_deploy(repo, hub, "backend", *named, "--dry-run", BACKEND_TOKEN=LOCK)

    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    per_space = BACKEND_STEPS[1:]
    assert step_names(result.stdout) == ["space_info"] * len(spaces) + per_space * len(spaces)
    targets = [re.search(r"\(repo_id='([^']+)'|\(space='([^']+)'", line).group(1, 2) for line in steps(result.stdout)]
    assert [a or b for a, b in targets] == spaces + [space for space in spaces for _ in per_space]
    headers = [line for line in result.stdout.splitlines() if line.startswith("Space ")]
    assert headers == [f"Space {i} of {len(spaces)}: {space}" for i, space in enumerate(spaces, 1)]
    assert_no_secret(result, WRITE, LOCK)


def test_rolling_redeploy_refuses_before_any_change(repo: Path, hub: Hub) -> None:
    hub.add("me/gpu-1")
    hub.add("me/gpu-3", private=False)
    spaces = ["--space", "me/gpu-1", "--space", "me/gpu-2", "--space", "me/gpu-3"]

    public = run_deploy(repo, hub, "backend", *spaces, BACKEND_TOKEN=LOCK)
    checked = hub.routes()
    twice = run_deploy(repo, hub, "backend", "--space", "me/gpu-1", "--space", "Me/GPU-1", BACKEND_TOKEN=LOCK)

    assert (public.returncode, twice.returncode) == (2, 2)
    assert "me/gpu-3 exists and is not private" in public.stderr
    assert checked == [f"GET /api/spaces/{space}" for space in ("me/gpu-1", "me/gpu-2", "me/gpu-3")]
    assert "named twice" in twice.stderr
    assert hub.routes() == checked  # the second run sent nothing


def test_frontend_refuses_a_backend_named_twice_or_itself_among_several(repo: Path, hub: Hub) -> None:
    twice = run_deploy(repo, hub, "frontend", "--space", "me/backdrop", "--backend", SPACE, "--backend", SPACE)
    itself = run_deploy(
        repo, hub, "frontend", "--space", "me/backdrop", "--backend", SPACE, "--backend", "me/backdrop"
    )

    assert (twice.returncode, itself.returncode) == (2, 2)
    assert "named twice" in twice.stderr
    assert "same Space" in itself.stderr
    assert hub.requests == []


# --- refusals: exit 2, nothing sent -------------------------------------------------------------------------------


def test_frontend_refuses_to_be_its_own_backend(repo: Path, hub: Hub) -> None:
    result = run_deploy(repo, hub, "frontend", "--space", "Me/Backdrop", "--backend", "me/backdrop")

    assert result.returncode == 2
    assert "same Space" in result.stderr
    assert hub.requests == []


def test_frontend_refuses_the_write_token_as_the_public_spaces_read_token(repo: Path, hub: Hub) -> None:
    result = run_deploy(repo, hub, "frontend", "--space", "me/backdrop", "--backend", SPACE, BACKEND_READ_TOKEN=WRITE)

    assert result.returncode == 2
    assert "not your write token" in result.stderr
    assert hub.requests == []
    assert_no_secret(result, WRITE)


def test_frontend_without_a_read_token_and_no_terminal_says_what_to_set(repo: Path, hub: Hub) -> None:
    result = run_deploy(repo, hub, "frontend", "--space", "me/backdrop", "--backend", SPACE)

    assert result.returncode == 2
    assert "set BACKEND_READ_TOKEN" in result.stderr
    assert hub.requests == []


def test_backend_refuses_an_existing_public_space_after_one_read(repo: Path, hub: Hub) -> None:
    hub.add(SPACE, private=False)

    result = run_deploy(repo, hub, "backend", "--space", SPACE, BACKEND_TOKEN=LOCK)

    assert result.returncode == 2
    assert "exists and is not private" in result.stderr
    assert hub.routes() == [f"GET /api/spaces/{SPACE}"]
    assert_no_secret(result, WRITE, LOCK)


# --- a whole backend deploy against the stand-in ------------------------------------------------------------------


def test_backend_deploy_makes_the_dry_runs_calls_and_waits_for_running(repo: Path, hub: Hub) -> None:
    hub.add(SPACE)
    hub.spaces[SPACE]["files"] = {".gitattributes", "README.md", "old_module.py"}
    # A runtime that names no commit: the first RUNNING, before any build, is taken for the previous revision's.
    hub.stages = ["RUNNING", "BUILDING", "APP_STARTING", "RUNNING"]
    args = ["backend", "--space", SPACE, "--skip-smoke-test", "--poll-interval", "0.05", "--timeout", "5"]

    planned = run_deploy(repo, hub, *args, "--dry-run", BACKEND_TOKEN=LOCK)
    result = run_deploy(repo, hub, *args, BACKEND_TOKEN=LOCK)

    assert result.returncode == 0, result.stderr
    assert steps(result.stdout) == steps(planned.stdout)
    assert step_names(result.stdout) == BACKEND_STEPS[:-1]
    base = f"/api/spaces/{SPACE}"
    routes = [route for route in hub.routes() if not route.endswith("/runtime")]
    assert routes == [
        f"GET {base}",
        "POST /api/repos/create",
        *[f"POST {base}/variables"] * 6,
        f"POST {base}/secrets",
        f"POST {base}/hardware",
        f"GET {base}/tree/main",
        "POST /api/validate-yaml",
        f"POST {base}/preupload/main",
        f"POST {base}/commit/main",
    ]
    assert hub.routes().count(f"GET {base}/runtime") == 4
    assert {auth for _, _, auth, _ in hub.requests} == {f"Bearer {WRITE}"}
    assert json.loads(hub.body("POST /api/repos/create")[0])["visibility"] == "private"
    assert json.loads(hub.body(f"POST {base}/secrets")[0]) == {"key": "BACKEND_TOKEN", "value": LOCK}
    assert json.loads(hub.body(f"POST {base}/hardware")[0]) == {"flavor": "t4-small"}
    assert hub.spaces[SPACE]["files"] == {
        ".gitattributes",
        "README.md",
        "app.py",
        "back_settings.py",
        "environment.py",
        "helpers/imaging.py",
    }
    assert re.search(r"BUILDING\n.*APP_STARTING\n.*RUNNING\n", result.stdout)
    assert_no_secret(result, WRITE, LOCK)


def test_backend_build_error_prints_the_build_logs_tail_masked_and_exits_1(repo: Path, hub: Hub) -> None:
    hub.stages = ["BUILDING", "BUILD_ERROR"]
    hub.logs = ["Collecting torch==99", f"token was {WRITE}", "ERROR: No matching distribution found for torch==99"]

    result = run_deploy(repo, hub, "backend", "--space", SPACE, "--poll-interval", "0.05", "--timeout", "5")

    assert result.returncode == 1, result.stderr
    assert f"GET /api/spaces/{SPACE}/logs/build" in hub.routes()
    assert "ERROR: No matching distribution found for torch==99" in result.stderr
    assert "token was ***" in result.stderr
    assert "ended in BUILD_ERROR" in result.stderr
    assert "Client.predict" not in result.stdout
    assert_no_secret(result, WRITE)


def test_backend_deploy_waits_for_the_uploads_build_not_the_previous_revisions_running(repo: Path, hub: Hub) -> None:
    hub.add(SPACE)
    # Setting variables restarts the previous revision (APP_STARTING, RUNNING) before the upload's build starts.
    hub.stages = ["RUNNING@old", "APP_STARTING@old", "RUNNING@old", "BUILDING@new", "RUNNING@new"]
    args = ["backend", "--space", SPACE, "--skip-smoke-test", "--poll-interval", "0.05", "--timeout", "5"]

    result = run_deploy(repo, hub, *args, BACKEND_TOKEN=LOCK)

    assert result.returncode == 0, result.stderr
    assert hub.routes().count(f"GET /api/spaces/{SPACE}/runtime") == 5
    assert re.search(r"RUNNING \(the previous revision 0000000\)\n.*BUILDING\n.*RUNNING\n", result.stdout)


def test_rolling_redeploy_stops_at_the_first_failed_build_and_leaves_the_rest_untouched(repo: Path, hub: Hub) -> None:
    spaces = ["me/gpu-1", "me/gpu-2", "me/gpu-3"]
    for space in spaces:
        hub.add(space)
    hub.stages = {
        "me/gpu-1": ["RUNNING@old", "BUILDING@new", "RUNNING@new"],
        "me/gpu-2": ["RUNNING@old", "BUILDING@new", "BUILD_ERROR@new"],
        "me/gpu-3": ["RUNNING@old"],
    }
    hub.logs = ["ERROR: No matching distribution found for torch==99"]
    named = [option for space in spaces for option in ("--space", space)]

    result = run_deploy(repo, hub, "backend", *named, "--skip-smoke-test", "--poll-interval", "0.05", "--timeout", "5")

    assert result.returncode == 1, result.stderr
    routes = hub.routes()
    assert routes[:3] == [f"GET /api/spaces/{space}" for space in spaces]  # every Space checked first
    touched = [
        route.split()[1].split("/")[3] for route in routes[3:] if route.startswith(("GET /api/s", "POST /api/s"))
    ]
    assert touched == sorted(touched)  # gpu-1's calls, all of them, then gpu-2's
    assert routes.index("POST /api/spaces/me/gpu-1/commit/main") < routes.index("POST /api/spaces/me/gpu-2/variables")
    assert routes.count("GET /api/spaces/me/gpu-1/runtime") == 3  # its new build's RUNNING, not the old one
    assert "gpu-3" not in " ".join(routes[3:])  # not touched: no call at all after the check
    assert hub.spaces["me/gpu-3"]["sha"] == "0" * 40
    assert "ERROR: No matching distribution found for torch==99" in result.stderr
    assert "me/gpu-2 ended in BUILD_ERROR" in result.stderr
    assert (
        "rolling redeploy stopped at me/gpu-2 (Space 2 of 3): done: me/gpu-1; failed: me/gpu-2; not touched: me/gpu-3"
        in result.stderr
    )
    assert_no_secret(result, WRITE, LOCK)


# --- the wait-and-report logic on stage sequences, with a fake clock -----------------------------------------------


class FakeSpace:
    """get_space_runtime walks through `stages` (the last one repeats; "RUNNING@abc": RUNNING with sha "abc");
    sleeping advances the fake clock."""

    def __init__(self, *stages: str, logs: tuple[str, ...] = ()) -> None:
        self.stages, self.logs = list(stages), logs
        self.now, self.polls, self.log_requests = 0.0, 0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def get_space_runtime(self, repo_id: str) -> SpaceRuntime:
        self.polls += 1
        assert self.polls < 1000, "the wait never stopped polling"
        stage, _, sha = (self.stages.pop(0) if len(self.stages) > 1 else self.stages[0]).partition("@")
        return SpaceRuntime({"stage": stage, **({"sha": sha} if sha else {})})

    def fetch_space_logs(self, repo_id: str, *, build: bool = False) -> Iterator[str]:
        self.log_requests.append(build)
        return iter(self.logs)

    def wait(self, timeout: float = 600, settle_s: float = 0, revision: str | None = None) -> tuple[str, list[str]]:
        said: list[str] = []
        runtime = deploy_plan.wait_until_running(
            lambda: self.get_space_runtime(SPACE),
            timeout=timeout,
            poll_s=10,
            revision=revision,
            say=said.append,
            settle_s=settle_s,
            clock=self.clock,
            sleep=self.sleep,
        )
        return runtime.stage, [line.split(maxsplit=2)[-1] for line in said]


def test_wait_returns_at_once_on_running() -> None:
    space = FakeSpace("RUNNING")
    assert space.wait() == ("RUNNING", ["RUNNING"])
    assert space.polls == 1


def test_wait_follows_building_then_running_and_prints_each_change_once() -> None:
    space = FakeSpace("BUILDING", "BUILDING", "RUNNING_BUILDING", "APP_STARTING", "RUNNING")
    assert space.wait() == ("RUNNING", ["BUILDING", "RUNNING_BUILDING", "APP_STARTING", "RUNNING"])
    assert space.now == 40


def test_wait_takes_a_terminal_stage_seen_before_any_build_for_the_previous_revisions() -> None:
    space = FakeSpace("BUILD_ERROR", "RUNNING", "BUILDING", "RUNNING")
    assert space.wait(settle_s=100) == ("RUNNING", ["BUILD_ERROR", "RUNNING", "BUILDING", "RUNNING"])
    assert space.polls == 4

    unchanged = FakeSpace("RUNNING")  # nothing to rebuild: RUNNING counts once the settle time has passed
    assert unchanged.wait(settle_s=25) == ("RUNNING", ["RUNNING"])
    assert unchanged.now == 30


def test_wait_keeps_polling_through_an_unknown_stage() -> None:
    assert FakeSpace("SLEEPING", "BUILDING", "RUNNING").wait() == ("RUNNING", ["SLEEPING", "BUILDING", "RUNNING"])


def test_wait_for_a_revision_takes_only_that_revisions_stages() -> None:
    restarted = FakeSpace("RUNNING@old", "APP_STARTING@old", "RUNNING@old", "BUILDING@new", "RUNNING@new")
    previous = " (the previous revision old)"
    shown = [f"RUNNING{previous}", f"APP_STARTING{previous}", f"RUNNING{previous}", "BUILDING", "RUNNING"]
    assert restarted.wait(revision="new") == ("RUNNING", shown)
    assert restarted.polls == 5

    failed_before = FakeSpace("BUILD_ERROR@old", "BUILDING@new", "RUNTIME_ERROR@new")
    assert failed_before.wait(revision="new")[0] == "RUNTIME_ERROR"
    assert failed_before.polls == 3

    unchanged = FakeSpace("RUNNING@new")  # an upload with no change: its commit is the one running
    assert unchanged.wait(revision="new", settle_s=100) == ("RUNNING", ["RUNNING"])
    assert unchanged.polls == 1

    no_sha = FakeSpace("RUNNING", "BUILDING", "RUNNING")  # a runtime that names no commit: as before
    assert no_sha.wait(revision="new", settle_s=100)[0] == "RUNNING"
    assert no_sha.polls == 3


def test_wait_for_a_revision_times_out_saying_the_previous_one_still_runs() -> None:
    space = FakeSpace("RUNNING@old")
    with pytest.raises(deploy_plan.WaitTimeout, match=r"still RUNNING \(the previous revision old\) after 60 s"):
        space.wait(timeout=60, revision="new")


def test_wait_times_out_at_the_bound() -> None:
    space = FakeSpace("BUILDING")
    with pytest.raises(deploy_plan.WaitTimeout, match="still BUILDING after 60 s"):
        space.wait(timeout=60)
    assert space.now == 60


def report(space: FakeSpace) -> None:
    plan = deploy_plan.Plan(space, secrets=[WRITE])  # type: ignore[arg-type]
    deploy_plan.wait_and_report(
        space, plan, SPACE, timeout=60, poll_s=10, settle_s=0, clock=space.clock, sleep=space.sleep
    )


def test_wait_and_report_returns_quietly_on_running() -> None:
    space = FakeSpace("BUILDING", "RUNNING", "RUNTIME_ERROR")
    report(space)
    assert space.log_requests == []
    assert space.polls == 2


@pytest.mark.parametrize(
    ("stages", "build_logs", "message"),
    [
        (("BUILDING", "BUILD_ERROR"), True, "ended in BUILD_ERROR"),
        (("APP_STARTING", "RUNTIME_ERROR"), False, "ended in RUNTIME_ERROR"),
        (("BUILDING",), True, "timed out: still BUILDING after 60 s"),
        (("APP_STARTING",), False, "timed out: still APP_STARTING after 60 s"),
    ],
)
def test_wait_and_report_prints_the_logs_tail_and_fails(
    stages: tuple[str, ...], build_logs: bool, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    space = FakeSpace(*stages, logs=("first line", f"token={WRITE}", "Traceback: boom"))
    with pytest.raises(deploy_plan.DeployError, match=message) as raised:
        report(space)
    assert raised.value.code == deploy_plan.Exit.FAILED
    assert space.log_requests == [build_logs]
    err = capsys.readouterr().err
    assert "token=***\nTraceback: boom\n" in err
    assert WRITE not in err


# --- the smoke test's checks, and --help -------------------------------------------------------------------------


RED = Image.new("RGB", (4, 4), "red")


def test_backend_outputs_must_be_the_photo_two_base64_webps_and_a_status() -> None:
    photo = functools.partial(deploy_plan.b64_image_problem, formats=deploy_plan.PHOTO_FORMATS)
    checks = [photo, deploy_plan.b64_image_problem, deploy_plan.b64_image_problem]
    webp, jpeg = png_b64(RED, "WEBP"), png_b64(RED, "JPEG")
    assert deploy_plan.check_outputs((jpeg, f"data:image/webp;base64,{webp}", webp, "Done in 1.2 s"), checks) == []
    assert deploy_plan.check_outputs((webp, webp, "Done"), checks) == ["expected 4 outputs, got tuple 3"]
    problems = deploy_plan.check_outputs((webp, "not base64!", png_b64(RED, "PNG"), ""), checks)
    assert problems == [
        "output 1: does not decode to an image (Error)",
        "output 2: a PNG image, not WEBP",
        "status: expected a sentence",
    ]


def test_frontend_outputs_must_be_two_image_files_and_a_status(tmp_path: Path) -> None:
    image, text = tmp_path / "overlay.webp", tmp_path / "result.png"
    Image.new("RGB", (4, 4)).save(image)
    text.write_text("not an image")
    checks = [deploy_plan.image_file_problem] * 2
    assert deploy_plan.check_outputs([str(image), {"path": str(image)}, "Done"], checks) == []
    assert deploy_plan.check_outputs([str(image), str(text), "Done"], checks) == [
        "output 1: not an image (UnidentifiedImageError)"
    ]
    assert deploy_plan.check_outputs([None, str(tmp_path / "gone.png"), "Done"], checks)[0].startswith("output 0")


def test_help_explains_every_option_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for command, options in [
        ("backend", ["--space", "--hardware", "--sleep-time", "--steps", "--queue-max-size", "--dry-run"]),
        ("frontend", ["--space", "--backend", "--hardware", "--wake-timeout", "--skip-smoke-test"]),
    ]:
        with pytest.raises(SystemExit) as exited:
            deploy.main([command, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert all(option in text for option in options)
        assert "exit codes:" in text
        assert re.search(r"^  2  usage error or refusal", text, re.MULTILINE)
        assert "rolling redeploy (backend with --space repeated):\n  every Space is checked first" in text
    with pytest.raises(SystemExit):
        deploy.main(["backend", "--help"])
    assert "repeat it for a rolling redeploy: one Space at a time" in " ".join(capsys.readouterr().out.split())


# --- deploy.py status: resends and refusals, from loopback servers serving /metrics --------------------------------

METRICS_TOKEN = "metricsTOKENdoNotPrint0123456789"
OLDER_JOBS = {("done", ""): 5, ("failed", ""): 1, ("lost", ""): 0, ("cancelled", ""): 0}
OLDER_JOBS |= {("refused", reason): 0 for reason in ("fair_share", "rate", "bad_input", "queue_full")}


class Metrics(ThreadingHTTPServer):
    """An app's /metrics, only for its token: `jobs` by (outcome, reason), and `resent` by `after` where the build
    counts resends (None: an older build), written by prometheus_client as the apps do."""

    def __init__(self, token: str, jobs: dict[tuple[str, str], float], resent: dict[str, float] | None) -> None:
        super().__init__(("127.0.0.1", 0), MetricsHandler)
        self.token, self.jobs, self.resent = token, dict(jobs), resent

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def text(self) -> bytes:
        registry = CollectorRegistry()
        jobs = Counter("backdrop_jobs", "Jobs by outcome.", ["outcome", "reason"], registry=registry)
        for labels, count in self.jobs.items():
            jobs.labels(*labels).inc(count)
        if self.resent is not None:
            resent = Counter("backdrop_jobs_resent", "Jobs sent again.", ["after"], registry=registry)
            for after, count in self.resent.items():
                resent.labels(after).inc(count)
        Gauge("backdrop_jobs_waiting", "Waiting now.", registry=registry).set(2)
        Gauge("backdrop_jobs_running", "Running now.", registry=registry).set(1)
        return generate_latest(registry)


class MetricsHandler(BaseHTTPRequestHandler):
    server: Metrics

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        allowed = self.path == "/metrics" and self.headers.get("authorization") == f"Bearer {self.server.token}"
        data = self.server.text() if allowed else b"Not Found"
        self.send_response(200 if allowed else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def apps() -> Iterator[list[Metrics]]:
    """Started /metrics servers: append one, it is served until the test ends."""
    servers: list[Metrics] = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def serve(apps: list[Metrics], token: str, jobs: dict, resent: dict[str, float] | None = None) -> Metrics:
    server = Metrics(token, jobs, resent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    apps.append(server)
    return server


def run_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setenv("METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("BACKEND_TOKEN", LOCK)
    code = deploy.main(["status", *args])
    return code, capsys.readouterr().out


def test_status_shows_resends_and_each_refusal_reason(
    apps: list[Metrics], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = OLDER_JOBS | {("refused", "fair_share"): 1, ("refused", "repeat_crash"): 2}
    jobs |= {("refused", "long_wait"): 1, ("refused", "gpu_quota"): 3}
    front = serve(apps, METRICS_TOKEN, jobs, {"waiting": 4, "running": 1})
    back = serve(apps, LOCK, {("done", ""): 6, ("refused", "bad_input"): 0, ("refused", "queue_full"): 0})

    code, screen = run_status(monkeypatch, capsys, "--frontend", front.url, "--backend", back.url)

    assert code == 0
    assert screen.splitlines()[:3] == [
        f"frontend {front.url}: up · waiting 2 · running 1",
        "  since start: done 5, failed 1, lost 0, cancelled 0, refused 7 (fair_share 1, rate 0, bad_input 0,"
        " queue_full 0, repeat_crash 2, long_wait 1, gpu_quota 3)",
        "  since start: resent 5 (while waiting 4, while running 1)",
    ]
    back_lines = screen.split(f"backend {back.url}: up")[1].splitlines()
    assert back_lines[1] == (
        "  since start: done 6, failed 0, lost 0, cancelled 0, refused 0 (fair_share 0, rate 0, bad_input 0,"
        " queue_full 0)"
    )
    assert "resent" not in screen.split("backend")[1]
    assert "older build" not in screen
    assert METRICS_TOKEN not in screen
    assert LOCK not in screen


def test_status_of_an_older_frontend_build_shows_what_it_counts_and_names_what_it_lacks(
    apps: list[Metrics], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    front = serve(apps, METRICS_TOKEN, OLDER_JOBS)

    code, screen = run_status(monkeypatch, capsys, "--frontend", front.url)

    assert code == 0
    assert screen.splitlines()[1:3] == [
        "  since start: done 5, failed 1, lost 0, cancelled 0, refused 0 (fair_share 0, rate 0, bad_input 0,"
        " queue_full 0)",
        "  not in its /metrics (an older build, or none since start): refused for repeat_crash, refused for long_wait,"
        " refused for gpu_quota, resent",
    ]


def test_status_watch_shows_the_resends_and_refusals_of_the_last_minutes(
    apps: list[Metrics], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = OLDER_JOBS | {("refused", r): 1 for r in ("repeat_crash", "long_wait", "gpu_quota")}
    front = serve(apps, METRICS_TOKEN, jobs, {"waiting": 3, "running": 1})

    class Stop(Exception):
        pass

    def between_scrapes(_: float) -> None:
        if front.jobs[("refused", "gpu_quota")] > 1:
            raise Stop
        front.jobs[("refused", "gpu_quota")] += 2
        front.jobs[("refused", "repeat_crash")] += 1
        front.resent = {"waiting": 3, "running": 4}

    monkeypatch.setattr(deploy_status.time, "sleep", between_scrapes)
    with pytest.raises(Stop):
        run_status(monkeypatch, capsys, "--frontend", front.url, "--watch", "30")
    first, second = capsys.readouterr().out.split(f"frontend {front.url}: up")[1:]

    assert "since start: resent 4 (while waiting 3, while running 1)" in first
    assert (
        "refused 3 (fair_share 0, rate 0, bad_input 0, queue_full 0, repeat_crash 1, long_wait 1, gpu_quota 1)"
        in first
    )
    assert "last 0 min: resent 3 (while waiting 0, while running 3)" in second
    assert (
        "refused 3 (fair_share 0, rate 0, bad_input 0, queue_full 0, repeat_crash 1, long_wait 0, gpu_quota 2)"
        in second
    )
