"""The README's main command end to end: both apps' own entry points, tiny models, the real gradio_client."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import EXAMPLE_PHOTO, ROOT, TLS, free_port
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.long
def test_run_local_serves_both_apps_and_ctrl_c_stops_both(tmp_path, tiny_models):
    front_port, back_port = free_port(), free_port()
    log = tmp_path / "run_local.log"
    command = [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--tiny", "--models-dir", str(tiny_models)]
    command += ["--port", str(front_port), "--backend-port", str(back_port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while "Backdrop is running" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        assert httpx.get(f"http://127.0.0.1:{back_port}/config").status_code == 401  # the backend is locked
        client = Client(f"http://127.0.0.1:{front_port}/", token=False, verbose=False, ssl_verify=TLS)
        overlay, result, status = client.predict(
            handle_file(str(EXAMPLE_PHOTO)), "casual", "female", api_name="/predict_api"
        )
        for path in (overlay, result):
            assert Image.open(path).size == (512, 512)
        assert status.startswith("Done in ")
        # No proxy in front: a caller who writes X-Forwarded-For is still its socket's address, whose share
        # (VISITOR_RATE, 6 a minute by default) these photos spend, each "from" an address of its own.
        said = [forged(front_port, f"203.0.113.{i}") for i in range(6)]
        assert said[:5] == ["Done"] * 5
        assert said[5].startswith("You have sent too many photos in the last minute."), said
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert port_is_free(front_port)
    assert port_is_free(back_port)
    output = log.read_text().split("Starting the private app", 1)[1]  # the apps' own logs, after the model build
    assert "Warm-up done" in output
    assert "torchvision" not in output  # transformers' notices while diffusers is imported (no_torchvision.py)
    for secret in ("Bearer", str(tmp_path / "m"), "Traceback"):
        assert secret not in output


def forged(port: int, address: str) -> str:
    """A run whose caller claims an address in X-Forwarded-For: 'Done', or the sentence it got."""
    client = Client(
        f"http://127.0.0.1:{port}/", token=False, verbose=False, ssl_verify=TLS, headers={"X-Forwarded-For": address}
    )
    try:
        return (
            "Done"
            if client.predict(handle_file(str(EXAMPLE_PHOTO)), "formal", "male", api_name="/predict_api")[
                2
            ].startswith("Done")
            else "not done"
        )
    except AppError as error:
        return str(error)
