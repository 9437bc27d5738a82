"""The front's files as a hostile client sees them: a flood of tiny uploads counted as the disk counts it and held
to a number of files, refusals that leave nothing and say nothing of what others keep, files served only to whom
they are for with no request header in their answers, and what a failed upload leaves swept away."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest
from conftest import EXAMPLE_PHOTO, Clock, front_app, raw_outputs, running, stack, wait_until

KEEP_S = 10  # keep_files_s here: the sweep then runs every 2.5 s (files.py); the files' time is a Clock
ONE = {"X-Forwarded-For": "198.51.100.1"}  # visitors told apart by the address a proxy appends (trusted_proxy_hops)
OTHER = {"X-Forwarded-For": "198.51.100.2"}
GRADIO_CLIENT = {"User-Agent": "gradio_client/2.7.2"}  # what gradio_client sends: a refusal is then no 429


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Gradio's cache folder for the apps of this test alone."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def upload(raw: httpx.Client, *files: tuple[str, bytes], headers: dict[str, str] | None = None) -> httpx.Response:
    return raw.post("gradio_api/upload", files=[("files", file) for file in files], headers=headers)


def on_disk(cache: Path) -> tuple[set[Path], int]:
    """The files in the cache folder's content folders, and the bytes they and their folders take (`du`)."""
    folders = [entry for entry in cache.iterdir() if entry.is_dir() and len(entry.name) == 64]
    files = {path for folder in folders for path in folder.iterdir()}
    return files, sum(path.stat().st_blocks * 512 for path in (*folders, *files))


def test_a_flood_of_tiny_uploads_is_held_to_the_file_bound_and_counted_as_the_disk_counts_it(public_app, cache):
    demo = front_app(public_app, None, keep_files_s=KEEP_S, visitor_files=5, trusted_proxy_hops=1)
    files = demo.files
    files.clock = Clock()
    with running(demo, public_app.serve) as url, httpx.Client(base_url=url, headers=ONE) as raw:
        answers = [upload(raw, (f"tiny-{i}.png", b"%016d" % i)) for i in range(8)]
        assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
        assert answers[5].text.startswith("You have uploaded too many photos in the last few minutes.")
        kept, du = on_disk(cache)
        assert kept == {Path(a.json()[0]) for a in answers[:5]}  # the refused left nothing, folders included
        assert len(list(cache.iterdir())) == 5
        assert abs(files.kept_bytes - du) <= files.block * len(kept)
        assert files.kept_bytes >= du - files.block  # never less than the disk holds: 5 x 16 bytes are ~40 kB

        many = [(f"many-{i}.png", b"%016d" % (100 + i)) for i in range(500)]  # 500 files in one request
        assert upload(raw, *many).status_code == 429
        refused = upload(raw, *many, headers=GRADIO_CLIENT)  # gradio_client: paths that name nothing
        assert refused.status_code == 200
        assert not any(Path(path).exists() for path in refused.json())
        assert on_disk(cache)[0] == kept
        assert len(list(cache.iterdir())) == 5

        files.clock.now += KEEP_S  # the claims lapse: room again
        assert upload(raw, ("later.png", b"0" * 16)).status_code == 200


def test_a_refused_upload_says_nothing_of_what_others_keep(public_app, cache):
    demo = front_app(public_app, None, keep_files_s=KEEP_S, visitor_files=1, trusted_proxy_hops=1)
    demo.files.clock = Clock()
    photo = EXAMPLE_PHOTO.read_bytes()
    with running(demo, public_app.serve) as url:
        one, other = httpx.Client(base_url=url, headers=ONE), httpx.Client(base_url=url, headers=OTHER)
        with one, other:
            kept = upload(one, ("photo.png", photo)).json()[0]  # one keeps the example photo
            mine = upload(other, ("mine.png", b"my own photo")).json()[0]  # other's one file
            for headers in ({}, GRADIO_CLIENT):
                held, unheld = (upload(other, ("photo.png", data), headers=headers) for data in (photo, photo[::-1]))
                assert (held.status_code, held.text) == (unheld.status_code, unheld.text)
                assert held.status_code == (200 if headers else 429)
            assert on_disk(cache)[0] == {Path(kept), Path(mine)}  # one's photo stays; nothing else was left


def test_an_upload_is_served_to_its_visitor_only_and_a_result_to_anyone(private_app, public_app, cache):
    with stack(private_app, public_app, front={"keep_files_s": KEEP_S, "trusted_proxy_hops": 1}) as s:
        s.front_app.files.clock = Clock()
        one, other = httpx.Client(base_url=s.front, headers=ONE), httpx.Client(base_url=s.front, headers=OTHER)
        with one, other:
            photo = upload(one, ("photo.png", EXAMPLE_PHOTO.read_bytes())).json()[0]
            assert one.get(f"gradio_api/file={photo}").content == EXAMPLE_PHOTO.read_bytes()  # the page's preview
            missing = str(Path(photo).with_name("no-such-photo.png"))
            for route, status in (("gradio_api/file=", 403), ("gradio_api/file/", 404)):  # file/: no route (guard)
                strangers, nothing = other.get(f"{route}{photo}"), other.get(f"{route}{missing}")
                assert strangers.status_code == nothing.status_code == status
                assert strangers.json()["detail"].replace(photo, missing) == nothing.json()["detail"]
                assert strangers.headers.keys() == nothing.headers.keys()
            assert other.head(f"gradio_api/file={photo}").status_code == 403
            stray = cache / "tmpstray"  # in the cache folder, but no one's
            stray.write_bytes(b"left behind")
            assert one.get(f"gradio_api/file={stray}").status_code == 403
            assert one.get("gradio_api/file=https://example.com/x.png").status_code == 403  # never fetched for anyone
            _, result, status = raw_outputs(one, photo)
            assert status.startswith("Done in ")
            assert other.get(f"gradio_api/file={result['path']}").status_code == 200  # whoever has its path


def test_a_file_answer_carries_no_request_header_back(public_app, cache):
    demo = front_app(public_app, None)
    photo = EXAMPLE_PHOTO.read_bytes()
    secret = {"x-secret-proxy": "abc-secret", "cookie": "session=xyz-secret", "content-type": "text/html"}
    with running(demo, public_app.serve) as url, httpx.Client(base_url=url) as raw:
        path = upload(raw, ("photo.png", photo)).json()[0]
        ranged = raw.get(f"gradio_api/file={path}", headers={**secret, "Range": "bytes=10-19"})
        plain = raw.get(f"gradio_api/file={path}", headers=secret)
    assert (ranged.status_code, ranged.content) == (206, photo[10:20])
    assert ranged.headers["content-range"] == f"bytes 10-19/{len(photo)}"
    assert (plain.status_code, plain.content) == (200, photo)
    for answer in (ranged, plain):
        assert "secret" not in str(answer.headers.raw)
        assert answer.headers.get_list("content-type") == ["image/png"]
        assert not {"x-secret-proxy", "cookie", "host", "range", "user-agent"} & set(answer.headers)


def test_what_a_failed_upload_leaves_is_swept(public_app, cache):
    demo = front_app(public_app, None, keep_files_s=KEEP_S)
    demo.files.clock = Clock()
    with running(demo, public_app.serve) as url, httpx.Client(base_url=url) as raw:
        kept = Path(upload(raw, ("kept.png", b"a photo that stays")).json()[0])
        # A file name Gradio refuses after it has stored the first file: the first in its folder, the rest as its
        # temporary files.
        assert upload(raw, ("first.png", b"first"), ("..", b"second"), ("third.png", b"third")).status_code == 400
        # An upload cut off halfway: its temporary file.
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as cut:
            part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="cut.png"\r\n\r\n' + b"x" * 5000
            head = b"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            cut.sendall(head + b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" + part)
            wait_until(lambda: any(entry.is_file() for entry in cache.iterdir()), what="Gradio's temporary file")
        wait_until(
            lambda: {Path(parent, name) for parent, _, names in os.walk(cache) for name in names} == {kept},
            what=lambda: f"only the kept upload; found {sorted(os.listdir(cache))}",
        )
        wait_until(lambda: list(cache.iterdir()) == [kept.parent], what="no folder left empty")
        assert raw.get(f"gradio_api/file={kept}").status_code == 200
