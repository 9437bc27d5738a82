"""Hardened edges: bounded decoding with the backend's sentences, no tracebacks from requests, no files piling up,
and no server path on any page."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
from pathlib import Path

import gradio as gr
import httpx
import pytest
from conftest import (
    API,
    EXAMPLE_PHOTO,
    ROOT,
    TOKEN,
    WAIT_S,
    Clock,
    front_app,
    png_header_only,
    raw_call,
    running,
    stack,
    visitor,
    wait_until,
)
from gradio_client import handle_file
from PIL import Image, JpegImagePlugin

import photos
from photo_rules import PhotoError

KEEP_S = 10  # keep_files_s of the tests below: time they spend on a clock of their own (conftest.Clock)
LIMITS = {"max_pixels": 40_000_000, "max_bytes": 10 * 2**20}


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


BAD_PHOTOS = {
    "60000×60000 PNG header": png_header_only(60_000, 60_000),
    "9000×9000 PNG header": png_header_only(9_000, 9_000),
    "animated GIF": animated_gif(),
    "text": b"hello, world\n" * 20,
}


@pytest.mark.parametrize("case", BAD_PHOTOS)
def test_the_front_refuses_what_the_backend_refuses_in_the_same_words(public_app, tmp_path, case):
    from imaging import decode_photo

    path = tmp_path / "upload"
    path.write_bytes(BAD_PHOTOS[case])
    with pytest.raises(gr.Error) as front:
        photos.photo_bytes(path, 1024, **LIMITS)
    with pytest.raises(PhotoError) as back:
        decode_photo(base64.b64encode(BAD_PHOTOS[case]).decode(), max_side=1024, **LIMITS)
    assert front.value.message == str(back.value)
    assert "Please send" in str(back.value)


def test_a_big_jpeg_is_decoded_at_a_fraction_of_its_size(public_app, tmp_path, monkeypatch):
    decoded: list[tuple[int, int]] = []
    load = JpegImagePlugin.JpegImageFile.load

    def recording_load(self):
        decoded.append(self.size)  # the size the decoder produces, after any draft
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    path = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), "teal").save(path, quality=80)
    with Image.open(io.BytesIO(photos.photo_bytes(path, 1024, **LIMITS))) as sent:
        assert (sent.format, sent.size) == ("JPEG", (1024, 683))
    assert decoded
    assert decoded[0][0] <= 6000 // 2  # at 1/2 scale or smaller, never the full 24 megapixels


def test_a_vanished_upload_or_an_unexpected_failure_is_a_sentence_and_a_short_line(public_app, tmp_path, caplog):
    photo = tmp_path / "secret-name.png"
    with pytest.raises(gr.Error) as gone:
        photos.photo_bytes(photo, 1024, **LIMITS)
    assert gone.value.message == photos.UPLOAD_AGAIN
    photo.write_bytes(EXAMPLE_PHOTO.read_bytes())
    caplog.set_level("INFO")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(photos.ImageOps, "exif_transpose", lambda *_, **__: 1 / 0)  # a decoder bug, say
        with pytest.raises(gr.Error) as failed:
            photos.photo_bytes(photo, 64, **LIMITS)  # downscaled: decoded here
    assert failed.value.message == photos.FAILED
    lines = [record.getMessage() for record in caplog.records if record.name == "backdrop"]
    assert lines == ["An upload was gone before it could be read.", "Reading an upload failed with ZeroDivisionError."]


def test_a_stopped_request_keeps_its_decoding_place_until_its_decode_ends(public_app, tmp_path, monkeypatch):
    started, finish = threading.Event(), threading.Event()

    def slow_decode(path: Path, max_side: int, max_pixels: int, max_bytes: int) -> bytes:
        started.set()
        finish.wait(10)
        return b"photo"

    monkeypatch.setattr(photos, "photo_bytes", slow_decode)
    upload = tmp_path / "cache" / "abc" / "photo.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"...")

    async def stop_while_decoding() -> None:
        reader = photos.PhotoReader(max_side=64, max_pixels=10**6, max_bytes=10**6, at_once=1)
        decoding = reader.decoding
        reading = asyncio.ensure_future(reader.read(upload))
        await asyncio.to_thread(started.wait, 10)
        reading.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
        assert decoding.locked()  # the thread still decodes: its place is still taken ...
        assert not reading.done()
        finish.set()
        with pytest.raises(asyncio.CancelledError):  # ... and the endpoint is cancelled all the same
            await reading
        assert not decoding.locked()

    asyncio.run(stop_while_decoding())


def test_no_request_writes_a_traceback_and_a_flood_costs_a_few_lines(
    private_app, public_app, caplog, capfd, monkeypatch
):
    import guard

    monkeypatch.setattr(guard, "LOG_EVERY_S", 3600.0)  # the whole flood within one log period, however slow it is
    caplog.set_level("INFO")
    with stack(private_app, public_app) as s:
        front_index = fn_index(s.front, {})
        back_headers = {"x-hf-authorization": f"Bearer {TOKEN}"}
        back_index = fn_index(s.back, back_headers)
        for base, headers, index in ((s.front, {}, front_index), (s.back, back_headers, back_index)):
            with httpx.Client(base_url=base, headers=headers, timeout=WAIT_S) as http:
                for _ in range(20):
                    for method, path, body in bad_requests(index):
                        http.request(method, path, json=body)
        assert visitor(s.front).predict(handle_file(str(EXAMPLE_PHOTO)), "casual", "male", api_name=API)
    out, err = capfd.readouterr()
    logged = [record.getMessage() for record in caplog.records if record.name == "guard"]
    assert "Traceback" not in out + err
    assert "Exception in ASGI application" not in out + err
    assert "Traceback" not in "\n".join(logged)
    assert len(logged) <= 12, logged  # 2 apps x (one line per kind of refusal or failure a log period)
    assert all(len(line) < 200 and "\n" not in line for line in logged), logged


def fn_index(base: str, headers: dict[str, str]) -> int:
    config = httpx.get(f"{base}config", headers=headers).json()
    return next(dep["id"] for dep in config["dependencies"] if dep["api_name"] == "predict_api")


def bad_requests(index: int) -> list[tuple[str, str, object]]:
    return [
        ("GET", "gradio_api/queue/data?session_hash=unknown", None),
        ("GET", "gradio_api/call/predict_api/unknown", None),
        ("POST", "gradio_api/queue/join", {"fn_index": index, "session_hash": "x", "data": ["abc"]}),
        ("POST", "gradio_api/queue/join", {"fn_index": index, "session_hash": "x", "data": [5, [1], {"a": 1}]}),
        ("POST", "gradio_api/call/predict_api", {"data": "garbage"}),
        ("POST", "gradio_api/queue/join", {"fn_index": index + 1000, "data": []}),
        ("POST", "gradio_api/run/other%0A%0AFAKE%20LOG%20LINE", {}),
    ]


def test_uploads_and_results_leave_the_disk_keep_files_s_after_their_last_use(
    private_app, public_app, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"  # Gradio's cache folder for these apps alone (others may be running on this machine)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    photo = tmp_path / "a-photo-of-its-own.png"
    with Image.open(EXAMPLE_PHOTO) as example:
        example.rotate(90).save(photo)

    with stack(private_app, public_app, front={"keep_files_s": KEEP_S}) as s:
        files = s.front_app.files
        files.clock = Clock()  # files lapse when the test moves it, not before
        client = visitor(s.front, download_files=str(tmp_path / "downloads"))
        for _ in range(3):
            status = client.predict(handle_file(str(photo)), "casual", "male", api_name=API)[2]
            assert status.startswith("Done in ")
        assert files_in(cache)
        files.clock.now += KEEP_S
        wait_until(lambda: not files_in(cache))  # the upload, its results: all gone once unused for keep_files_s
        wait_until(lambda: not list(cache.iterdir()))  # their folders too
        with httpx.Client(base_url=s.front) as raw:
            upload = raw.post("gradio_api/upload", files={"files": (photo.name, photo.read_bytes())}).json()[0]
            assert raw_call(raw, upload).startswith("Done in ")
            assert raw_call(raw, upload, "formal").startswith("Done in ")  # a second try on the same upload
            assert raw_call(raw, "/etc/hostname") == ""  # refused (422) before it is queued: no such upload
            assert files_in(cache)  # the upload and the results of the calls above, never fetched ...
            files.clock.now += KEEP_S
            wait_until(lambda: not files_in(cache))  # ... are gone after keep_files_s
            assert raw_call(raw, upload) == photos.UPLOAD_AGAIN


def test_a_shared_photo_stays_while_either_of_its_visitors_uses_it(private_app, public_app, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "cache"))  # this app's uploads alone
    with stack(private_app, public_app, front={"keep_files_s": KEEP_S, "trusted_proxy_hops": 1}) as s:
        files = s.front_app.files
        files.clock = Clock()
        a, b = (
            httpx.Client(base_url=s.front, headers={"X-Forwarded-For": ip}) for ip in ("198.51.100.1", "198.51.100.2")
        )
        with a, b:
            # Both upload the example photo: Gradio keeps it once, at one path, with one claim for each of them.
            a_upload, b_upload = (
                raw.post(
                    "gradio_api/upload", files={"files": (EXAMPLE_PHOTO.name, EXAMPLE_PHOTO.read_bytes())}
                ).json()[0]
                for raw in (a, b)
            )
            assert a_upload == b_upload
            assert raw_call(b, b_upload).startswith("Done in ")
            assert raw_call(a, a_upload).startswith("Done in ")
            assert raw_call(b, b_upload).startswith("Done in ")
            files.clock.now += KEEP_S / 2
            assert raw_call(a, a_upload).startswith("Done in ")  # a's claim renewed; b's has half its time left
            files.clock.now += KEEP_S / 2 + 1
            assert raw_call(b, b_upload) == photos.UPLOAD_AGAIN  # b's lapsed; a's stands and keeps the photo
            assert Path(a_upload).exists()
            files.clock.now += KEEP_S
            wait_until(lambda: not Path(a_upload).exists())  # with both claims lapsed, the photo goes
            assert raw_call(a, a_upload) == raw_call(b, b_upload) == photos.UPLOAD_AGAIN


def files_in(folder: Path) -> set[Path]:
    """The files under `folder` now; one removed while it is listed is gone (the apps delete as the test looks)."""
    return {Path(parent, name) for parent, _, names in os.walk(folder) for name in names}


def test_gradio_keeps_no_record_of_the_files_removed(private_app, public_app, tmp_path, monkeypatch):
    """Gradio's own sweep keeps forever its record of a file that is gone: each removed file must leave them."""
    from standin import StandInPipeline

    from pool import Backends

    cache = tmp_path / "cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    with running(private_app.create_app(StandInPipeline()), private_app.serve, token=TOKEN) as back:
        demo = front_app(public_app, Backends.connect([back], TOKEN), keep_files_s=KEEP_S)
        demo.files.clock = Clock()
        with running(demo, public_app.serve) as url:
            records = demo.blocks.temp_file_sets
            before = sum(map(len, records))
            client = visitor(url, download_files=str(tmp_path / "downloads"))
            for turn in range(3):
                photo = tmp_path / f"photo-{turn}.png"
                with Image.open(EXAMPLE_PHOTO) as example:
                    example.rotate(90 * turn).save(photo)  # a new file each time, as each visitor's photo is
                assert client.predict(handle_file(str(photo)), "casual", "male", api_name=API)[2].startswith("Done")
            demo.files.clock.now += KEEP_S
            wait_until(lambda: not files_in(cache))
            assert [name for kept in records for name in kept if not Path(name).exists()] == []
            assert sum(map(len, records)) == before


def test_no_server_path_in_config_or_page_and_the_example_is_served(private_app, public_app):
    with stack(private_app, public_app) as s:
        texts = [httpx.get(f"{s.front}{path}").text for path in ("", "config", "gradio_api/info")]
        example = httpx.get(f"{s.front}examples/astronaut.png")
    for text in texts:
        assert str(ROOT) not in text
        assert str(EXAMPLE_PHOTO.parent) not in text
    assert example.status_code == 200
    assert example.content == EXAMPLE_PHOTO.read_bytes()


def test_a_small_photo_in_a_file_too_big_for_the_backend_is_encoded_again(public_app, tmp_path):
    """A 1024-px photo can still be a file larger than the backend takes (metadata, no compression)."""
    path = tmp_path / "heavy.png"
    Image.new("RGB", (600, 400), "teal").save(path, compress_level=0)
    sent = photos.photo_bytes(path, 1024, 40_000_000, max_bytes=path.stat().st_size - 1)
    with Image.open(io.BytesIO(sent)) as image:
        assert (image.format, image.size) == ("JPEG", (600, 400))
    assert photos.photo_bytes(path, 1024, 40_000_000, 10 * 2**20) == path.read_bytes()  # within the limit: as it is
