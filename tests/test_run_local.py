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
