"""Many gradio_client callers at once through the public app, each with a photo of its own: do all get their files?

    python scripts/bench.py callers [--callers 200]

Both apps run as their own processes on loopback (bench.py's stack, the stand-in backend at S = 0). Each caller
is a Client of its own (a session, as a visitor's), sends a small photo no other caller sends, and downloads its
overlay and result as gradio_client does. Prints how many callers got both of their own files, and what the
others got instead. (tests/test_journey.py runs the same with 40 callers.)
"""

from __future__ import annotations

import argparse
import collections
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import SSL, start_stack
from PIL import Image


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py callers", description=__doc__)
    parser.add_argument("--callers", type=int, default=200, help="callers at once")
    args = parser.parse_args(argv)
    from gradio_client import Client, handle_file

    folder = Path(tempfile.mkdtemp(prefix="bench-callers-"))
    photos = []
    for i in range(args.callers):
        photo = folder / f"caller-{i}.png"
        Image.new("RGB", (48, 32), (i % 256, (255 - i) % 256, (7 * i) % 256)).save(photo)
        photos.append(photo)

    def call(photo: Path) -> str | tuple[bytes, bytes]:
        try:
            client = Client(front, token=False, verbose=False, ssl_verify=SSL, download_files=str(folder / photo.stem))
            overlay, result, _ = client.predict(handle_file(str(photo)), "casual", "male", api_name="/predict_api")
            return Path(overlay).read_bytes(), Path(result).read_bytes()
        except Exception as error:
            return f"{type(error).__name__}: {str(error)[:80]}"

    _, front, processes = start_stack(0.0, secrets.token_urlsafe(16))
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(args.callers) as pool:
            outcomes = list(pool.map(call, photos))
        took = time.monotonic() - started
    finally:
        for process in processes:
            process.kill()
    files = [outcome for outcome in outcomes if not isinstance(outcome, str)]
    own = len({picture for pair in files for picture in pair}) == 2 * len(files)
    print(f"{len(files)} of {args.callers} callers got their overlay and result ({took:.0f} s); all distinct: {own}")
    for failure, count in collections.Counter(o for o in outcomes if isinstance(o, str)).most_common(5):
        print(f"  {count} x {failure}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
