"""A flood of tiny uploads from one visitor: what it leaves on disk, what the front counts, and what an upload's
bookkeeping costs as more files are kept.

    python scripts/bench.py files [--uploads 1000] [--size 16] [--root DIR]

The front (`public_space/app.py` with its default settings, no backend: uploads need none) runs as a process of
its own on loopback, with a Gradio folder of its own. One visitor sends --uploads files of --size bytes each, all
different, in two requests, as raw multipart (as a page or a script would); another sends as many through
gradio_client's own upload, one file a request. After each, prints the answers, the files and folders in the
front's folder, what the front counts (`backdrop_files_kept_bytes`, read from GET /metrics) and what `du -sb` and
`du -s` say of the folder. Then, in this process, `Files.uploaded` for one new upload with 10 and with 10,000 files
kept (median of 200).
--root runs the apps of another checkout (the same commands before a change, for "before" figures).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench import FRONT_CORES, ROOT, SSL, commit_of, free_port, start

QUIET = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
ONE, OTHER = "198.51.100.1", "198.51.100.2"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py files", description=__doc__)
    parser.add_argument("--uploads", type=int, default=1000, help="tiny uploads from each of the two visitors")
    parser.add_argument("--size", type=int, default=16, help="bytes in each")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose apps run (default: this one)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    print(f"apps of {root} (git {commit_of(root)})")
    flood(root, args.uploads, args.size)
    for kept in (10, 10_000):
        print(f"Files.uploaded, one new upload with {kept:>6} files kept: {bookkeeping(root, kept):8.1f} µs (median)")


def flood(root: Path, uploads: int, size: int) -> None:
    from gradio_client import Client

    folder = Path(tempfile.mkdtemp(prefix="bench-files-"))
    token, port = secrets.token_urlsafe(16), free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**QUIET, "GRADIO_TEMP_DIR": str(folder), "GRADIO_SERVER_PORT": str(port), "METRICS_TOKEN": token}
    env["TRUSTED_PROXY_HOPS"] = "1"  # the two visitors are told apart by the address a proxy would append
    process = start([sys.executable, str(root / "public_space" / "app.py")], env, url, FRONT_CORES)
    payloads = iter(range(10**9))
    print(f"the front's folder once started: du -sb {du('-sb', folder):,} B, du -s {du('-s', folder):,} kB")

    def tiny() -> tuple[str, bytes]:
        n = next(payloads)
        return f"tiny-{n}.png", n.to_bytes(8, "big") * (size // 8) + bytes(size % 8)

    try:
        with httpx.Client(base_url=url, headers={"X-Forwarded-For": ONE}, timeout=120) as raw:
            started = time.perf_counter()
            answers = [
                raw.post("gradio_api/upload", files=[("files", tiny()) for _ in range(part)]).status_code
                for part in (uploads // 2, uploads - uploads // 2)
            ]
            took = time.perf_counter() - started
        report(f"{uploads} uploads in 2 requests (raw multipart)", answers, took, folder=folder, url=url, token=token)

        client = Client(url, token=False, verbose=False, ssl_verify=SSL, headers={"X-Forwarded-For": OTHER})
        endpoint = client.endpoints[client._infer_fn_index("/predict_api", None)]
        source = Path(f"{folder}-sources")
        source.mkdir()
        answers, started = [], time.perf_counter()
        for _ in range(uploads):
            name, data = tiny()
            (source / name).write_bytes(data)
            path = endpoint._upload_file({"path": str(source / name)}, 0)["path"]  # as predict() uploads it
            answers.append("kept" if Path(path).is_relative_to(folder) and Path(path).exists() else "names nothing")
        took = time.perf_counter() - started
        what = f"+ {uploads} uploads through gradio_client, 1 a request"
        report(what, answers, took, folder=folder, url=url, token=token)
    finally:
        process.kill()
        subprocess.run(["rm", "-rf", str(folder), f"{folder}-sources"], check=False)


def report(what: str, answers: list, took: float, *, folder: Path, url: str, token: str) -> None:
    files = sum(len(names) for _, _, names in os.walk(folder))
    folders = sum(len(dirs) for _, dirs, _ in os.walk(folder))
    metrics = httpx.get(f"{url}metrics", headers={"Authorization": f"Bearer {token}"}).text
    counted = float(re.search(r"^backdrop_files_kept_bytes (\S+)$", metrics, re.MULTILINE)[1])
    apparent, used_kb = (du(option, folder) for option in ("-sb", "-s"))
    summary = ", ".join(f"{count} x {answer}" for answer, count in collections.Counter(answers).items())
    print(f"{what}: {summary} ({took:.1f} s)")
    print(f"  on disk: {files} files, {folders} folders; du -sb {apparent:,} B, du -s {used_kb:,} kB")
    # What du counts but for the cache folder itself, which grew to list a thousand names once and stays so large.
    under = [Path(parent, name) for parent, dirs, names in os.walk(folder) for name in dirs + names]
    content = sum(path.stat().st_blocks * 512 for path in under)
    print(f"  counted by the front: {counted:,.0f} B; everything under the folder takes {content:,} B")


def du(option: str, folder: Path) -> int:
    out = subprocess.run(["du", option, str(folder)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def bookkeeping(root: Path, kept: int, timed: int = 200) -> float:
    """Microseconds `Files.uploaded` takes for one new upload (a new visitor's) with `kept` files kept."""
    sys.path[:0] = [str(root / "public_space")]
    import files as files_module

    folder = Path(tempfile.mkdtemp(prefix="bench-files-kept-"))
    options = {"keep_s": 600, "quota_bytes": 2**62, "visitor_bytes": 2**62, "gradio_sets": []}
    parameters = files_module.Files.__init__.__code__.co_varnames  # this checkout's Files, or an older one's
    if "visitor_files" in parameters:
        options["visitor_files"] = 50
    if "trusted_hops" in parameters:
        options["trusted_hops"] = 1
    files = files_module.Files(folder, **options)
    now = files.clock()
    paths = [_tiny_file(folder, f"kept-{i}") for i in range(kept + timed)]
    for i, path in enumerate(paths[:kept]):  # each kept file some visitor's (as an upload would note it)
        if hasattr(files, "shares"):
            files._claim(f"visitor {i}", path, files._add(path, now), now)
        else:
            files._add(path, now).claims[f"visitor {i}"] = now
    times = []
    for i, path in enumerate(paths[kept:]):
        started = time.perf_counter()
        files.uploaded([str(path)], f"timed {i}")
        times.append(time.perf_counter() - started)
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    return 1e6 * statistics.median(times)


def _tiny_file(folder: Path, name: str) -> Path:
    path = folder / secrets.token_hex(32) / f"{name}.png"
    path.parent.mkdir()
    path.write_bytes(name.encode().ljust(16, b"."))
    return path.resolve()


if __name__ == "__main__":
    main(sys.argv[1:])
