"""The parts of `deploy.py` that do not parse arguments: the masked call `Plan`, the wait-and-report loop, and the
smoke test's checks. The wait loop takes its clock and sleep as arguments so tests can run stage sequences at once.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

from huggingface_hub import HfApi, SpaceRuntime, SpaceStage

SETTLE_S = 30.0  # without a commit to compare (the runtime has no sha): the previous stage may linger
LOG_LINES = 40

INTERMEDIATE = frozenset(
    {SpaceStage.BUILDING, SpaceStage.RUNNING_BUILDING, SpaceStage.APP_STARTING, SpaceStage.RUNNING_APP_STARTING}
)
FAILED = frozenset(
    {SpaceStage.BUILD_ERROR, SpaceStage.RUNTIME_ERROR, SpaceStage.CONFIG_ERROR, SpaceStage.NO_APP_FILE}
    | {SpaceStage.STOPPED, SpaceStage.PAUSED, SpaceStage.DELETING}
)
TERMINAL = FAILED | {SpaceStage.RUNNING}  # any other stage, an unknown one included, is waited on
BUILD_LOG_STAGES = frozenset({SpaceStage.BUILDING, SpaceStage.BUILD_ERROR, SpaceStage.CONFIG_ERROR})


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2


class DeployError(Exception):
    """The Hub or the Space failed."""

    code = Exit.FAILED


class Refused(DeployError):
    """Bad arguments or an unsafe target, found before anything was changed."""

    code = Exit.USAGE


class WaitTimeout(TimeoutError):
    def __init__(self, stage: str, timeout: float, shown: str | None = None) -> None:
        super().__init__(f"still {shown or stage} after {timeout:g} s")
        self.stage = stage


class SpaceApi(Protocol):
    """The two HfApi methods that the wait-and-report logic uses."""

    def get_space_runtime(self, repo_id: str) -> SpaceRuntime: ...
    def fetch_space_logs(self, repo_id: str, *, build: bool = False) -> Iterable[str]: ...


class Plan:
    """Prints each Hub call, secrets masked, and makes it unless this is a dry run (`api` is None).

    Both runs go through the same `step`s in the same order, so a dry run prints the real run's plan.
    """

    def __init__(self, api: HfApi | None, secrets: Iterable[str | None] = ()) -> None:
        self.api, self.secrets, self.count = api, [s for s in secrets if s], 0

    def mask(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def say(self, text: str, *, err: bool = False) -> None:
        print(self.mask(text), file=sys.stderr if err else sys.stdout, flush=True)

    def step(self, name: str, run: Callable[[Any], Any], note: str = "", **shown: Any) -> Any:
        self.count += 1
        args = ", ".join(f"{k}={'***' if v in self.secrets else repr(v)}" for k, v in shown.items())
        self.say(f"[{self.count}] {name}({args})" + (f"  # {note}" if note else ""))
        return None if self.api is None else run(self.api)

    def call(self, method: str, note: str = "", **kwargs: Any) -> Any:
        return self.step(method, lambda api: getattr(api, method)(**kwargs), note, **kwargs)


def runtime_revision(runtime: SpaceRuntime) -> str | None:
    """The commit whose build the runtime's stage is about: the Hub's /runtime answer has it as `sha`, which
    huggingface_hub 2.4 does not parse (`SpaceRuntime.__init__` keeps the whole answer in `raw`)."""
    sha = (runtime.raw or {}).get("sha")
    return sha if isinstance(sha, str) and sha else None


def wait_until_running(
    get_runtime: Callable[[], SpaceRuntime],
    *,
    timeout: float,
    poll_s: float,
    revision: str | None = None,
    say: Callable[[str], None] = print,
    settle_s: float = SETTLE_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> SpaceRuntime:
    """Poll until the new build's terminal stage, printing each change; raise `WaitTimeout` after `timeout` s.

    Just after an upload the Hub may still report the previous revision's RUNNING or BUILD_ERROR (and a change of
    variables restarts that revision first). With `revision` (the upload's commit) and a runtime that names its
    commit, only a stage of that commit counts. Otherwise a terminal stage counts once a build or a start has been
    seen, or after `settle_s`.
    """
    start, last, fresh = clock(), "", False
    while True:
        runtime, elapsed = get_runtime(), clock() - start
        running = runtime_revision(runtime)
        ours = None if revision is None or running is None else running == revision
        shown = runtime.stage if ours is not False else f"{runtime.stage} (the previous revision {running[:7]})"
        if shown != last:
            say(f"    {elapsed:6.1f} s  {shown}")
            last = shown
        fresh = fresh or runtime.stage in INTERMEDIATE
        if runtime.stage in TERMINAL and (ours or (ours is None and (fresh or elapsed >= settle_s))):
            return runtime
        if elapsed >= timeout:
            raise WaitTimeout(runtime.stage, timeout, shown)
        sleep(max(0.0, min(poll_s, timeout - elapsed)))


def wait_and_report(api: SpaceApi, plan: Plan, space: str, *, timeout: float, poll_s: float, **wait: Any) -> None:
    """Wait for the new build's RUNNING; on a failure stage or a timeout print the logs' tail, raise `DeployError`."""
    try:
        runtime = wait_until_running(
            lambda: api.get_space_runtime(space), timeout=timeout, poll_s=poll_s, say=plan.say, **wait
        )
    except WaitTimeout as error:
        print_logs(api, plan, space, build=error.stage in BUILD_LOG_STAGES)
        raise DeployError(f"{space} timed out: {error}") from None
    if runtime.stage == SpaceStage.RUNNING:
        return
    if message := (runtime.raw or {}).get("errorMessage"):
        plan.say(f"{space}: {message}", err=True)
    print_logs(api, plan, space, build=runtime.stage in BUILD_LOG_STAGES)
    raise DeployError(f"{space} ended in {runtime.stage}")


def print_logs(api: SpaceApi, plan: Plan, space: str, *, build: bool) -> None:
    kind = "build" if build else "run"
    try:
        tail = deque(api.fetch_space_logs(space, build=build), maxlen=LOG_LINES)
    except Exception as error:
        plan.say(f"(could not fetch the {kind} logs: {type(error).__name__}: {error})", err=True)
        return
    plan.say(f"--- last {len(tail)} lines of the {kind} logs of {space} (fetch_space_logs) ---", err=True)
    for line in tail:
        plan.say(line.rstrip("\n"), err=True)


PHOTO_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # the photo comes back as it was sent, when it needed no change


def b64_image_problem(value: Any, formats: tuple[str, ...] = ("WEBP",)) -> str | None:
    """What is wrong with `value` as a base64 image in one of `formats` (a data URL is fine), or None."""
    from PIL import Image

    wanted = " or ".join(formats)
    if not isinstance(value, str) or not value:
        return f"expected base64 text, got {type(value).__name__}"
    try:
        data = base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            return None if image.format in formats else f"a {image.format} image, not {wanted}"
    except (binascii.Error, ValueError, OSError) as error:
        return f"does not decode to an image ({type(error).__name__})"


def image_file_problem(value: Any) -> str | None:
    """What is wrong with `value` as a downloaded image file (a path, or a dict with one), or None."""
    from PIL import Image

    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not Path(path).is_file():
        return f"expected an image file, got {type(value).__name__}"
    try:
        with Image.open(path) as image:
            image.verify()
    except OSError as error:
        return f"not an image ({type(error).__name__})"
    return None


def check_outputs(outputs: Any, checks: list[Callable[[Any], str | None]]) -> list[str]:
    """The problems with `outputs`: one check per image output, then a non-empty status sentence."""
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(checks) + 1:
        return [f"expected {len(checks) + 1} outputs, got {type(outputs).__name__} {len(outputs or ())}"]
    problems = [f"output {i}: {problem}" for i, check in enumerate(checks) if (problem := check(outputs[i]))]
    if not isinstance(outputs[-1], str) or not outputs[-1].strip():
        problems.append("status: expected a sentence")
    return problems


def smoke_test(space: str, *, token: str | bool, photo: Path, backend: bool, timeout: float) -> str:
    """Call `predict_api` once with the example photo through gradio_client, check the outputs, return the status."""
    from gradio_client import Client, handle_file

    image = base64.b64encode(photo.read_bytes()).decode() if backend else handle_file(str(photo))
    photo_check = functools.partial(b64_image_problem, formats=PHOTO_FORMATS)
    checks = [photo_check, b64_image_problem, b64_image_problem] if backend else [image_file_problem] * 2
    try:
        client = Client(space, token=token, verbose=False, httpx_kwargs={"timeout": 60})  # type: ignore[arg-type]
        outputs = client.submit(image, "casual", "male", api_name="/predict_api").result(timeout=timeout)
    except Exception as error:
        raise DeployError(f"smoke test of {space} failed: {type(error).__name__}: {error}") from None
    if problems := check_outputs(outputs, checks):
        raise DeployError(f"smoke test of {space} failed: {'; '.join(problems)}")
    return outputs[-1]
