"""Deploy Backdrop's two Spaces to the Hugging Face Hub, wait until they run, and smoke-test them.

    python scripts/deploy.py backend  --space OWNER/backdrop-gpu --hardware t4-small --dry-run
    python scripts/deploy.py backend  --space OWNER/gpu-1 --space OWNER/gpu-2 --dry-run   # a rolling redeploy
    python scripts/deploy.py frontend --space OWNER/backdrop --backend OWNER/backdrop-gpu --dry-run
    python scripts/deploy.py frontend --space OWNER/backdrop --backend OWNER/gpu-1 --backend OWNER/gpu-2 --dry-run

The backend (private_space/) is always a private Space; the frontend (public_space/) is public and relays to it,
or to several backends (each visitor's job goes to the one expected to finish it first). Several backends are
redeployed one at a time (a rolling redeploy), so the others keep serving while one rebuilds.
Every Hub call goes through one Plan (deploy_plan.py): a real run prints each call, secrets as ***, and makes it;
--dry-run prints the same calls in the same order and makes none, with no network at all. Your write token comes
from HF_TOKEN or the login cache (`hf auth login`), never from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from deploy_plan import DeployError, Exit, Plan, Refused, smoke_test, wait_and_report
from huggingface_hub import HfApi, SpaceHardware, get_token
from huggingface_hub.errors import RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from settings_tables import settings_of

if TYPE_CHECKING:
    from environment import Settings  # each Space's own copy (private_space/, public_space/)

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "public_space" / "examples" / "astronaut.png"
IGNORE = ["*__pycache__*", "*.pyc", ".gradio/*", "flagged/*", ".pytest_cache/*"]
SECRET_ENV = ("HF_TOKEN", "BACKEND_TOKEN", "BACKEND_READ_TOKEN")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
URL = re.compile(r"^https?://[^\s,]+$")
HARDWARE = [flavor.value for flavor in SpaceHardware]
MASK = "***"
BACK = settings_of("private_space").SETTINGS  # each option's default is the app's own (one source per fact)
FRONT = settings_of("public_space").SETTINGS
# ZeroGPU runs several GPU calls of one Space at once, each on its own GPU, and tells visitors beyond the Space's
# slots "Waiting for a GPU slot on this Space": two at once doubles throughput without hogging the shared pool.
ZERO_GPU_CONCURRENCY = 2
CPU_VAE_MODEL = "madebyollin/taesd"  # on CPU the full VAE decode is 60 % of a request; this one is 20x faster
PLACEHOLDER = "<BACKEND_READ_TOKEN>"  # stands for the token a dry run does not ask for

EPILOG = """\
exit codes:
  0  deployed and smoke-tested (with --dry-run: the plan was printed)
  1  the Hub or the Space failed: a Hub error, BUILD_ERROR or RUNTIME_ERROR (the logs' tail is printed),
     --timeout ran out (the logs' tail is printed), or the smoke test failed
  2  usage error or refusal, before any change: bad arguments, no token, frontend and backend are the same
     Space, the backend Space exists and is not private, the read token is your write token, no app.py

rolling redeploy (backend with --space repeated):
  every Space is checked first (missing or private, else refused: exit 2, nothing changed); then one Space at
  a time is configured, uploaded, waited for until it runs the build of this upload's commit (the stage of the
  previous revision does not count), and smoke-tested; only then is the next one touched, so the pool always has
  the other backends serving. The first failure stops it with exit 1 and names the Spaces done, the one that
  failed, and those not touched.

tokens (never on the command line; every secret is printed as ***):
  HF_TOKEN or `hf auth login`  your write token, for every Hub call
  BACKEND_TOKEN                backend: optional lock, set as the private Space's BACKEND_TOKEN secret
                               (left as it is when unset); the smoke test then sends it. On the Hub it
                               must be the read token the public Space holds as HF_TOKEN
  BACKEND_READ_TOKEN           frontend: a read token for the private Space, set as the public Space's
                               HF_TOKEN secret (asked for when unset and a terminal is attached)
"""


def _repo_id(value: str) -> str:
    if not REPO_ID.match(value):
        raise argparse.ArgumentTypeError(f"expected OWNER/NAME, got {value!r}")
    return value


def _backend(value: str) -> str:
    """A private Space's id, or the URL of a self-hosted private_space/app.py."""
    if not (REPO_ID.match(value) or URL.match(value)):
        raise argparse.ArgumentTypeError(f"expected OWNER/NAME or an http(s) URL, got {value!r}")
    return value


def _seconds(value: str) -> float:
    if not re.fullmatch(r"\d+(\.\d+)?", value) or float(value) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _variable(settings: Settings, name: str) -> dict[str, str]:
    """An option that sets the Space's variable `name`: its default and meaning are the app's own."""
    (setting,) = (setting for setting in settings.listed if setting.name == name)
    return {"default": setting.default, "help": f"variable {name}: {setting.meaning}"}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and shows each option's default, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.default not in (None, False, argparse.SUPPRESS)
        return (action.help or "") + (" (default: %(default)s)" if shown else "")


def build_parser() -> argparse.ArgumentParser:
    kinds = {"epilog": EPILOG, "formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(prog="deploy.py", description=__doc__, **kinds)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--dry-run", action="store_true", help="print every Hub call, in order, secrets masked; make none")
    add("--timeout", type=_seconds, default=1800, metavar="S", help="how long to wait for RUNNING after the upload")
    add("--poll-interval", type=_seconds, default=10, metavar="S", help="seconds between two checks of the stage")
    add("--smoke-timeout", type=_seconds, default=300, metavar="S", help="how long the smoke test's call may take")
    add("--skip-smoke-test", action="store_true", help="stop once the Space is RUNNING, without calling it")
    flavors = "Space hardware, one of: " + ", ".join(HARDWARE)

    backend = commands.add_parser(
        "backend",
        parents=[common],
        help="deploy private_space/ as a private GPU Space",
        description="Create or update the private GPU Space from private_space/, then call its predict_api. "
        "With --space repeated: a rolling redeploy, one Space after the other (see below).",
        **kinds,
    )
    add = backend.add_argument
    add(
        "--space",
        required=True,
        action="append",
        type=_repo_id,
        metavar="OWNER/NAME",
        help="the private Space to create or update; repeat it for a rolling redeploy: one Space at a time, each "
        "uploaded, RUNNING its new build and smoke-tested before the next is touched",
    )
    add("--hardware", default="t4-small", choices=HARDWARE, metavar="FLAVOR", help=flavors)
    add("--sleep-time", type=int, metavar="S", help="idle seconds before it sleeps; -1: never (paid hardware only)")
    add("--segmentation-model", metavar="ID", **_variable(BACK, "SEGMENTATION_MODEL"))
    add("--background-model", metavar="ID", **_variable(BACK, "BACKGROUND_MODEL"))
    add("--steps", type=int, metavar="N", **_variable(BACK, "BACKGROUND_STEPS"))
    add("--queue-max-size", type=int, metavar="N", **_variable(BACK, "QUEUE_MAX_SIZE"))
    add("--gpu-duration", type=int, metavar="S", **_variable(BACK, "GPU_DURATION_S"))
    add(
        "--gpu-concurrency",
        type=int,
        metavar="N",
        help=f"variable GPU_CONCURRENCY: GPU jobs at once; default {ZERO_GPU_CONCURRENCY} on zero-* hardware (ZeroGPU "
        "runs each on a GPU of its own), 1 elsewhere (one GPU)",
    )
    add(
        "--vae-model",
        metavar="ID",
        help="variable VAE_MODEL: a tiny autoencoder that decodes instead of the full VAE (4x faster requests on "
        f"CPU); default {CPU_VAE_MODEL} on cpu-* hardware, none on GPUs; '' for none",
    )

    frontend = commands.add_parser(
        "frontend",
        parents=[common],
        help="deploy public_space/ as the public Space",
        description="Create or update the public Space from public_space/, then call it with no token at all.",
        **kinds,
    )
    add = frontend.add_argument
    add("--space", required=True, type=_repo_id, metavar="OWNER/NAME", help="the public Space to create or update")
    add(
        "--backend",
        required=True,
        action="append",
        type=_backend,
        metavar="OWNER/NAME",
        help="a private Space (or URL); repeat it for several: variable BACKEND, the comma-joined list",
    )
    add("--hardware", default="cpu-basic", choices=HARDWARE, metavar="FLAVOR", help=flavors)
    add("--wake-timeout", type=int, metavar="S", **_variable(FRONT, "BACKEND_WAKE_TIMEOUT"))
    frontend.set_defaults(sleep_time=None)

    status = commands.add_parser(
        "status",
        help="one screen from both Spaces' /metrics",
        description="Read the Spaces' /metrics (frontend: METRICS_TOKEN; backends: BACKEND_TOKEN) and print one "
        "screen: up or not, queue now, jobs, refusals and failures, p50/p95 wait and run time, each backend's share.",
        **kinds,
    )
    add = status.add_argument
    add("--frontend", type=_backend, metavar="OWNER/NAME", help="the public Space (or URL)")
    add("--backend", action="append", default=[], type=_backend, metavar="OWNER/NAME", help="a private Space or URL")
    add("--watch", type=_seconds, metavar="S", help="refresh every S seconds; 'last hour' from the scrapes kept")
    return parser


def source_files(folder: Path) -> list[str]:
    """The files upload_folder will send, after IGNORE; refuses a folder without app.py and README.md."""
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    files = list(filter_repo_objects(files, ignore_patterns=IGNORE))
    if missing := [name for name in ("app.py", "README.md") if name not in files]:
        raise Refused(f"{folder} has no {' or '.join(missing)}: nothing to deploy")
    return files


def _revision(folder: Path) -> str:
    """The commit this deploy comes from, for the Space's commit message: what a rollback checks out."""

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    if not (commit := git("rev-parse", "--short", "HEAD")):
        return "an unknown revision"
    changed = git("status", "--porcelain", "--", str(folder))
    return f"{commit} with uncommitted changes in {folder.name}/" if changed else commit


def _is_private(api: HfApi, space: str) -> bool | None:
    """True or False for an existing Space, None for a missing one."""
    try:
        return api.space_info(space).private is True
    except RepositoryNotFoundError:
        return None


def _read_token(plan: Plan, backend: str, write_token: str | None) -> str:
    token = os.environ.get("BACKEND_READ_TOKEN") or None
    if token is None and plan.api is None:
        plan.say("    BACKEND_READ_TOKEN is not set: the real run will ask for it")
        token = PLACEHOLDER
    elif token is None:
        if not sys.stdin.isatty():
            raise Refused(
                f"set BACKEND_READ_TOKEN to a fine-grained token that can read {backend}: "
                "it becomes the public Space's HF_TOKEN secret"
            )
        token = getpass.getpass(f"Read token for {backend} (fine-grained, read access; input hidden): ").strip()
    if not token or token == (write_token or os.environ.get("HF_TOKEN")):
        raise Refused("BACKEND_READ_TOKEN must be a read token, not empty and not your write token")
    plan.secrets.append(token)
    return token


def _configure_upload_wait(
    plan: Plan,
    args: argparse.Namespace,
    space: str,
    folder: Path,
    *,
    private: bool,
    variables: dict[str, str],
    secret: tuple[str, str | None],
) -> None:
    """The steps both Spaces share: create, variables, secret, hardware, upload (starts the build), wait."""
    files = source_files(folder)
    plan.call("create_repo", repo_id=space, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    for key, value in variables.items():
        plan.call("add_space_variable", repo_id=space, key=key, value=value)
    if secret[1]:
        plan.call("add_space_secret", repo_id=space, key=secret[0], value=secret[1])
    else:
        plan.say(f"    {secret[0]} is not set: the Space's {secret[0]} secret, if any, stays as it is")
    sleep = {} if args.sleep_time is None else {"sleep_time": args.sleep_time}
    plan.call("request_space_hardware", repo_id=space, hardware=args.hardware, **sleep)
    plan.say(f"    {len(files)} files from {folder.name}/: {', '.join(files)}")
    commit = plan.call(
        "upload_folder",
        repo_id=space,
        repo_type="space",
        folder_path=str(folder),
        ignore_patterns=list(IGNORE),
        delete_patterns="*",
        commit_message=f"Deploy {args.command} from {_revision(folder)}",
    )
    if commit is not None:
        plan.say(f"    committed {commit.commit_url}")

    def wait(api: HfApi) -> None:
        revision = commit.oid if commit is not None else None
        wait_and_report(api, plan, space, timeout=args.timeout, poll_s=args.poll_interval, revision=revision)

    plan.step(
        "wait_until_running",
        wait,
        "until the runtime's sha is the upload's commit; on BUILD_ERROR, RUNTIME_ERROR or timeout: print the tail "
        "of fetch_space_logs, exit 1",
        repo_id=space,
        poll=f"get_space_runtime every {args.poll_interval:g} s",
        timeout_s=args.timeout,
    )


def _smoke_test(plan: Plan, args: argparse.Namespace, space: str, *, token: str | bool, backend: bool) -> None:
    """One predict_api call with the example photo: with a token to the backend, with none to the frontend."""
    if args.skip_smoke_test:
        return

    def run(_: HfApi) -> str:
        return smoke_test(space, token=token, photo=PHOTO, backend=backend, timeout=args.smoke_timeout)

    shown = {"space": space, "token": MASK if token is not False else False, "photo": PHOTO.name}
    status = plan.step("Client.predict", run, **shown, api_name="/predict_api")
    if status is not None:
        plan.say(f"    smoke test passed: {status}")


def deploy_backend(plan: Plan, args: argparse.Namespace, write_token: str | None) -> None:
    """One private Space, or several as a rolling redeploy: every check first, then one Space after the other."""
    spaces, folder, lock = args.space, ROOT / "private_space", os.environ.get("BACKEND_TOKEN") or None
    source_files(folder)
    if len({space.lower() for space in spaces}) < len(spaces):
        raise Refused(f"a Space is named twice: {', '.join(spaces)}")
    if lock is not None and len(lock) < 16:
        raise Refused("BACKEND_TOKEN is shorter than 16 characters: use a long random secret")
    if args.gpu_concurrency is not None and args.gpu_concurrency < 1:
        raise Refused("--gpu-concurrency must be 1 or more")
    note = "refused unless missing or private"
    for space in spaces:
        private = plan.step("space_info", lambda api, space=space: _is_private(api, space), note, repo_id=space)
        if private is False:
            raise Refused(f"{space} exists and is not private (public or protected): the GPU backend must be private")
    zero_gpu = args.hardware.startswith("zero")
    variables = {
        "SEGMENTATION_MODEL": args.segmentation_model,
        "BACKGROUND_MODEL": args.background_model,
        "BACKGROUND_STEPS": str(args.steps),
        "QUEUE_MAX_SIZE": str(args.queue_max_size),
        "GPU_DURATION_S": str(args.gpu_duration),
        "GPU_CONCURRENCY": str(
            args.gpu_concurrency if args.gpu_concurrency is not None else ZERO_GPU_CONCURRENCY if zero_gpu else 1
        ),
    }
    vae_model = CPU_VAE_MODEL if args.vae_model is None and args.hardware.startswith("cpu") else args.vae_model
    if vae_model:  # set only when used: on GPUs the full VAE costs little and paints a little sharper
        variables["VAE_MODEL"] = vae_model
    secret = ("BACKEND_TOKEN", lock)
    for turn, space in enumerate(spaces):
        if len(spaces) > 1:
            plan.say(f"Space {turn + 1} of {len(spaces)}: {space}")
        try:
            _configure_upload_wait(plan, args, space, folder, private=True, variables=variables, secret=secret)
            _smoke_test(plan, args, space, token=lock or write_token or "", backend=True)
        except Exception as error:
            if len(spaces) == 1:
                raise
            raise DeployError(_stopped(error, spaces, turn)) from None


def _stopped(error: Exception, spaces: list[str], failed: int) -> str:
    """Why a rolling redeploy stopped, and where: the Spaces done, the one that failed, those not touched."""
    why = str(error) if isinstance(error, DeployError) else f"{type(error).__name__}: {error}"
    done, untouched = ", ".join(spaces[:failed]) or "none", ", ".join(spaces[failed + 1 :]) or "none"
    return (
        f"{why}\nrolling redeploy stopped at {spaces[failed]} (Space {failed + 1} of {len(spaces)}): "
        f"done: {done}; failed: {spaces[failed]}; not touched: {untouched}"
    )


def deploy_frontend(plan: Plan, args: argparse.Namespace, write_token: str | None) -> None:
    space, backends, folder = args.space, args.backend, ROOT / "public_space"
    if space.lower() in (backend.lower() for backend in backends):
        raise Refused(f"frontend and backend are the same Space ({space}): the backend must stay private")
    if len({backend.lower() for backend in backends}) < len(backends):
        raise Refused(f"a backend is named twice: {', '.join(backends)}")
    source_files(folder)
    secret = ("HF_TOKEN", _read_token(plan, ", ".join(backends), write_token))
    variables = {
        "BACKEND": ",".join(backends),
        "BACKEND_WAKE_TIMEOUT": str(args.wake_timeout),
        # Who a visitor is (fair share, rate): off Spaces the app believes no X-Forwarded-For (0); on Spaces the
        # visitor's address is the entry that Hugging Face's proxy appends, one hop from the right.
        "TRUSTED_PROXY_HOPS": "1",
    }
    _configure_upload_wait(plan, args, space, folder, private=False, variables=variables, secret=secret)
    _smoke_test(plan, args, space, token=False, backend=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        from deploy_status import status

        spaces = [("frontend", args.frontend, os.environ.get("METRICS_TOKEN"))] if args.frontend else []
        lock = os.environ.get("BACKEND_TOKEN") or get_token()
        spaces += [("backend", backend, lock) for backend in args.backend]
        return status(spaces, watch=args.watch)
    plan = Plan(None, (os.environ.get(name) for name in SECRET_ENV))
    token: str | None = None
    spaces = args.space if args.command == "backend" else [args.space]
    named = ", ".join(spaces)
    try:
        if args.dry_run:
            source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the login cache"
            plan.say(f"Dry run: nothing is sent. Plan for {args.command} {named} (write token from {source}):")
        else:
            if not (token := get_token()):
                raise Refused("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a write token")
            plan.secrets.append(token)
            plan.api = HfApi(token=token, library_name="backdrop-deploy")
            plan.say(f"Deploying {args.command} to {named}" + (", one at a time:" if len(spaces) > 1 else ":"))
        deploy = deploy_backend if args.command == "backend" else deploy_frontend
        deploy(plan, args, token)
    except DeployError as error:
        plan.say(f"{'refused' if error.code == Exit.USAGE else 'failed'}: {error}", err=True)
        return error.code
    except Exception as error:  # a Hub or network error: its masked message is what CI needs
        plan.say(f"failed: {type(error).__name__}: {error}", err=True)
        return Exit.FAILED
    deployed = f"Done: {named} {'is' if len(spaces) == 1 else 'are'} deployed."
    plan.say("Dry run done: nothing was changed." if args.dry_run else deployed)
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
