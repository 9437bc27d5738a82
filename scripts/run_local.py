"""Run both Spaces on this machine: the private backend behind a random token, the public app in front of it.

    python scripts/run_local.py --tiny    # tiny random-weight models built locally: offline, for a quick look
    python scripts/run_local.py           # the real default models from the Hub (a GPU helps)

Ctrl-C stops both apps, leaving no process behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url: str, process: subprocess.Popen, timeout: float, headers: dict[str, str] | None = None) -> None:
    """Wait until `url` answers, or fail as soon as the process behind it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"The app serving {url} exited with code {process.returncode}.")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s.")


def stop(processes: list[subprocess.Popen]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="build and use tiny local models (offline)")
    parser.add_argument("--port", type=int, default=7860, help="the public app's port (default 7860)")
    parser.add_argument("--backend-port", type=int, default=8001, help="the private app's port (default 8001)")
    parser.add_argument("--host", default="127.0.0.1", help="where both apps listen (default 127.0.0.1)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=ROOT / ".tiny-models",
        help="where --tiny keeps its models (built if missing)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the backend to load models")
    args = parser.parse_args()

    token = secrets.token_urlsafe(24)  # never printed: only the two child processes get it
    env = {**os.environ, "GRADIO_SERVER_NAME": args.host, "GRADIO_ANALYTICS_ENABLED": "False"}
    if args.tiny:
        if not all((args.models_dir / part).exists() for part in ("segmentation", "background")):
            builder = [sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), "--out", str(args.models_dir)]
            subprocess.run(builder, check=True)
        env |= {
            "SEGMENTATION_MODEL": str(args.models_dir / "segmentation"),
            "BACKGROUND_MODEL": str(args.models_dir / "background"),
            "HF_HUB_OFFLINE": "1",
        }
    backend_url = f"http://{args.host}:{args.backend_port}/"
    public_url = f"http://{args.host}:{args.port}/"
    processes: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops both apps as Ctrl-C does
    signal.signal(signal.SIGINT, _interrupt)  # Ctrl-C too, even when started where SIGINT is ignored (`cmd &`)
    try:
        backend_env = env | {"BACKEND_TOKEN": token, "GRADIO_SERVER_PORT": str(args.backend_port)}
        processes.append(subprocess.Popen([sys.executable, "app.py"], cwd=ROOT / "private_space", env=backend_env))
        print(f"Starting the private app on {backend_url} (loading models)…", flush=True)
        wait_ready(f"{backend_url}config", processes[0], args.timeout, {"Authorization": f"Bearer {token}"})
        public_env = env | {"BACKEND": backend_url, "HF_TOKEN": token, "GRADIO_SERVER_PORT": str(args.port)}
        public_env["TRUSTED_PROXY_HOPS"] = "0"  # no proxy in front here: a caller's X-Forwarded-For names no one
        public_env.pop("SEGMENTATION_MODEL", None)
        public_env.pop("BACKGROUND_MODEL", None)
        processes.append(subprocess.Popen([sys.executable, "app.py"], cwd=ROOT / "public_space", env=public_env))
        wait_ready(public_url, processes[1], 120)
        print(f"\nBackdrop is running: open {public_url}  (Ctrl-C stops both apps)\n", flush=True)
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        print("One of the apps exited; stopping the other.", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nStopping both apps…", flush=True)
        return 0
    finally:
        stop(processes)


if __name__ == "__main__":
    sys.exit(main())
