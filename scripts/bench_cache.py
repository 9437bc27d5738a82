"""The result cache while the GPU queue is long, measured on both apps as processes on loopback.

    python scripts/bench.py example-cache [--service-time 0.5] [--waiting 20]

The backend is the real private app around the stand-in pipeline (S seconds a job, a queue of 256); the front is
`public_space/app.py` itself with its default result cache (fair share off: C sends many photos at once). A, B and
C are three addresses, as a proxy appends them (TRUSTED_PROXY_HOPS=1).
Visitor A runs the example photo once: a real run. Then --waiting other photos, each of its own, are sent at once
until the backend's queue holds that many waiting. Then visitor B (another address) runs the example photo.
Prints B's time at the caller (upload, answer and both downloads), and for comparison the time of a new photo
sent at that moment, which waits its turn.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench import BACKEND_CORES, FRONT_CORES, PHOTO, ROOT, SSL, free_port, start
from PIL import Image

API = "/predict_api"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service-time", type=float, default=0.5, help="the stand-in's seconds per job (S)")
    parser.add_argument("--waiting", type=int, default=20, help="jobs waiting in the GPU queue when B asks")
    args = parser.parse_args(argv)
    from gradio_client import Client, handle_file

    token = secrets.token_urlsafe(16)
    back_port, front_port = free_port(), free_port()
    back, front = f"http://127.0.0.1:{back_port}/", f"http://127.0.0.1:{front_port}/"
    auth = {"Authorization": f"Bearer {token}"}
    quiet = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    serve = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--serve-backend", str(back_port)]
    processes = [
        start(
            [*serve, "--service-time", str(args.service_time)],
            {**quiet, "BACKEND_TOKEN": token},
            f"{back}config",
            BACKEND_CORES,
            auth,
        )
    ]
    front_env = {**quiet, "BACKEND": back, "HF_TOKEN": token, "GRADIO_SERVER_PORT": str(front_port)}
    front_env |= {"MAX_JOBS_PER_VISITOR": "0", "VISITOR_RATE": "", "TRUSTED_PROXY_HOPS": "1"}  # A, B, C: 3 addresses
    try:
        processes.append(start([sys.executable, str(ROOT / "public_space" / "app.py")], front_env, front, FRONT_CORES))
        a, b, c = (
            Client(front, token=False, verbose=False, ssl_verify=SSL, headers={"X-Forwarded-For": ip})
            for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3")
        )
        started = time.perf_counter()
        first = a.predict(handle_file(str(PHOTO)), "casual", "female", api_name=API)[2]
        print(f"visitor A, the example photo, a real run: {time.perf_counter() - started:.2f} s ({first})")
        with tempfile.TemporaryDirectory() as folder:
            photos = []
            for i in range(args.waiting + 2):  # two more: the GPU's own job and the one the gate lets in beside it
                photos.append(Path(folder) / f"photo-{i}.png")
                Image.new("RGB", (320 + i, 240), (i * 11 % 256, 90, 160)).save(photos[-1])
            fillers = [c.submit(handle_file(str(photo)), "formal", "male", api_name=API) for photo in photos]
            deadline = time.monotonic() + 60
            while waiting(back, auth) < args.waiting:
                if time.monotonic() > deadline:
                    raise SystemExit("the GPU queue never filled")
                time.sleep(0.05)
            print(f"jobs waiting in the GPU queue now: {waiting(back, auth)} (S = {args.service_time} s each)")
            started = time.perf_counter()
            again = b.predict(handle_file(str(PHOTO)), "casual", "female", api_name=API)[2]
            took = time.perf_counter() - started
            print(f"visitor B, the example photo again, with the queue full: {took:.3f} s ({again})")
            print(f"  the GPU queue still holds {waiting(back, auth)} waiting: B took no place in it")
            extra = Path(folder) / "new.png"
            Image.new("RGB", (300, 300), "teal").save(extra)
            started = time.perf_counter()
            b.predict(handle_file(str(extra)), "casual", "female", api_name=API)
            print(f"visitor B, a new photo sent then: {time.perf_counter() - started:.2f} s (it waited its turn)")
            for job in fillers:
                job.result(timeout=120)
    finally:
        for process in processes:
            process.kill()


def waiting(back: str, auth: dict[str, str]) -> int:
    return int(httpx.get(f"{back}gradio_api/queue/status", headers=auth).json()["queue_size"])


if __name__ == "__main__":
    main(sys.argv[1:])
