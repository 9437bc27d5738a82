"""The result cache (public_space/results.py): repeats cost no GPU, the example's results are everyone's, a
visitor's own photo's results are theirs alone, and nothing an older build of the backend made is given back."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
from conftest import API, EXAMPLE_PHOTO, TOKEN, free_port, front_app, kill, raw_call, running, stack, visitor
from gradio_client import handle_file
from PIL import Image
from standin import StandInPipeline

from backends import Backend
from photos import UPLOAD_AGAIN
from pool import Backends
from relay import BUILD_HEADER, Finished
from results import AGAIN, EVERYONE, Results

CACHE = {"result_cache_entries": 8, "trusted_proxy_hops": 1}  # visitors told apart by X-Forwarded-For


def run(client, photo: Path, category: str = "casual", gender: str = "male") -> tuple[str, str, str]:
    return client.predict(handle_file(str(photo)), category, gender, api_name=API)


def own_photo(folder: Path, colour: str) -> Path:
    path = folder / f"{colour}.png"
    Image.new("RGB", (320, 240), colour).save(path)
    return path


def test_a_repeat_never_reaches_the_pipeline_and_only_the_examples_results_are_shared(
    private_app, public_app, tmp_path: Path
) -> None:
    with stack(private_app, public_app, front=CACHE) as s:
        ada = visitor(s.front, {"X-Forwarded-For": "203.0.113.1"})
        bob = visitor(s.front, {"X-Forwarded-For": "203.0.113.2"})
        ran = s.standin.entered  # the warm-up
        first = run(ada, EXAMPLE_PHOTO)
        assert (s.standin.entered, first[2].startswith("Done in ")) == (ran + 1, True)
        again = run(ada, EXAMPLE_PHOTO)
        shared = run(bob, EXAMPLE_PHOTO)  # another visitor, the example: Gradio's cached-examples convention
        assert s.standin.entered == ran + 1
        assert again[2] == shared[2] == AGAIN
        for made, given in ((first[0], shared[0]), (first[1], shared[1])):
            assert Path(given).read_bytes() == Path(made).read_bytes()
        run(bob, EXAMPLE_PHOTO, "formal")  # other choices are another request
        assert s.standin.entered == ran + 2

        mine = own_photo(tmp_path, "teal")
        assert run(ada, mine)[2].startswith("Done in ")
        assert run(ada, mine)[2] == AGAIN
        assert s.standin.entered == ran + 3
        theirs = run(bob, mine)  # the same bytes from another visitor: never ada's result
        assert theirs[2].startswith("Done in ")
        assert s.standin.entered == ran + 4
        assert run(bob, mine)[2] == AGAIN  # and now bob has his own
        assert s.standin.entered == ran + 4


def test_a_cached_answer_still_checks_the_input_and_whose_upload_it_is(private_app, public_app) -> None:
    with stack(private_app, public_app, front=CACHE) as s:
        ada, bob = (httpx.Client(base_url=s.front, headers={"X-Forwarded-For": ip}) for ip in IPS)
        with ada, bob:
            uploads = [
                ada.post("gradio_api/upload", files={"files": ("a.png", EXAMPLE_PHOTO.read_bytes())}).json()[0]
                for _ in range(3)
            ]  # three uploads of the example, all one file: three runs of her own
            upload = uploads[0]
            assert raw_call(ada, upload).startswith("Done in ")
            assert raw_call(bob, upload) == UPLOAD_AGAIN  # not his upload, cached answer or not
            assert raw_call(ada, upload, category="pyjamas").startswith("Unknown category 'pyjamas'")
            assert raw_call(ada, upload) == AGAIN


IPS = ("203.0.113.1", "203.0.113.2")


@contextlib.contextmanager
def backend_on(private_app, port: int, standin: StandInPipeline) -> Iterator[str]:
    """The private app around `standin` on `port` (the same URL each time: a redeploy)."""
    demo = private_app.create_app(standin)
    private_app.serve(demo, token=TOKEN, warm_up=False, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        kill(demo)


def test_the_backend_says_its_build_only_behind_its_token_and_other_settings_are_another_build(private_app) -> None:
    builds = []
    for standin in (StandInPipeline(), StandInPipeline(), StandInPipeline(steps=3)):
        with backend_on(private_app, free_port(), standin) as url:
            refused = httpx.get(f"{url}config")
            assert (refused.status_code, BUILD_HEADER in refused.headers) == (401, False)
            said = httpx.get(f"{url}gradio_api/queue/status", headers={"Authorization": f"Bearer {TOKEN}"})
            builds.append(said.headers[BUILD_HEADER])
    assert builds[0] == builds[1] != builds[2]
    assert all(len(build) == 16 and int(build, 16) >= 0 for build in builds)  # a hash, nothing in clear


def test_after_a_redeploy_with_other_settings_nothing_the_old_build_made_is_given_back(
    private_app, public_app
) -> None:
    port = free_port()
    old, new = StandInPipeline(), StandInPipeline(steps=3)
    front = front_app(public_app, Backends.connect([f"http://127.0.0.1:{port}/"], TOKEN), **CACHE)
    with running(front, public_app.serve) as url:
        ada = visitor(url, {"X-Forwarded-For": "203.0.113.1"})
        with backend_on(private_app, port, old):
            run(ada, EXAMPLE_PHOTO)
            assert run(ada, EXAMPLE_PHOTO)[2] == AGAIN
            assert old.entered == 1
        with backend_on(private_app, port, new):  # redeployed at once, at the same address, with other settings
            assert run(ada, EXAMPLE_PHOTO)[2].startswith("Done in ")
            assert new.entered == 1
            assert run(ada, EXAMPLE_PHOTO)[2] == AGAIN  # what the new build made is kept in its turn
            assert (old.entered, new.entered) == (1, 1)


def test_with_backends_of_mixed_builds_only_a_matching_one_that_is_up_counts(private_app, public_app) -> None:
    ports = free_port(), free_port()
    first, second = StandInPipeline(), StandInPipeline(steps=3)
    pool = Backends([Backend(f"http://127.0.0.1:{port}/", TOKEN, name=f"backend {port}") for port in ports])
    with running(front_app(public_app, pool, **CACHE), public_app.serve) as url:
        ada = visitor(url, {"X-Forwarded-For": "203.0.113.1"})
        with backend_on(private_app, ports[1], second):
            with backend_on(private_app, ports[0], first):
                run(ada, EXAMPLE_PHOTO)
                assert run(ada, EXAMPLE_PHOTO)[2] == AGAIN  # its maker is up
                made_by = first if first.entered else second
                assert first.entered + second.entered == 1
            if made_by is first:  # the first build is gone: the second must run it, whatever is kept
                assert run(ada, EXAMPLE_PHOTO)[2].startswith("Done in ")
                assert second.entered == 1
            else:
                assert run(ada, EXAMPLE_PHOTO)[2] == AGAIN


def finished(size: int, build: str = "b1") -> Finished:
    return Finished("photo" * 1000, "o" * size, "r" * size, "Done in 1.0 s", build)


def test_the_bounds_hold_least_recently_used_first_and_the_photo_echo_is_not_kept() -> None:
    results = Results(max_entries=3, max_bytes=10_000, example=EXAMPLE_PHOTO.read_bytes())
    requests = [results.key(digest(bytes([i])), "casual", "male", "address 203.0.113.1") for i in range(5)]
    for request in requests[:3]:
        results.keep(request, finished(1_000))
    results.kept.move_to_end(requests[0])  # used again: the second is now the least recently used
    results.keep(requests[3], finished(1_000))
    assert list(results.kept) == [requests[2], requests[0], requests[3]]
    assert results.bytes == 6_000
    assert all(entry.image_b64 == "" for entry in results.kept.values())
    results.keep(requests[4], finished(3_500))  # 6 000 + 7 000 bytes: two go to make room
    assert list(results.kept) == [requests[3], requests[4]]
    assert results.bytes == 9_000 <= results.max_bytes
    results.keep(requests[0], finished(1_000, build=None))  # a backend that gives no build: never kept
    assert requests[0] not in results.kept
    assert results.key(digest(EXAMPLE_PHOTO.read_bytes()), "casual", "male", "address 203.0.113.1")[3] == EVERYONE


def digest(photo: bytes) -> bytes:
    return hashlib.sha256(photo).digest()
