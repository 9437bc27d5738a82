"""A stand-in for the Hugging Face Hub's whoami, on loopback: no test reaches the real Hub, nor uses a real token.

Imported by conftest before anything imports huggingface_hub, which reads HF_ENDPOINT once, at import: every Hub
call of the tests' process goes here. `HUB.accounts` maps the tokens a test hands out to account names; any other
token is refused (401) as the Hub refuses it; `HUB.hang()` holds every answer until `HUB.answer()`. Tests that
need whoami turn huggingface_hub's offline mode off for their own length (the `hub` fixture): the calls still end
here, on loopback.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading

HANG_AT_MOST_S = 60.0  # a held answer is given anyway, so a failing test cannot hang a server thread for good


class StandInHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.accounts: dict[str, str] = {}
        self.asked: list[str] = []  # the SHA-256 of each token whoami was asked about, in order (never the token)
        self._answering = threading.Event()
        self._answering.set()

    def hang(self) -> None:
        self._answering.clear()

    def answer(self) -> None:
        self._answering.set()

    def reset(self) -> None:
        self.accounts.clear()
        self.asked.clear()
        self.answer()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: StandInHub

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/api/whoami-v2":
            self._reply(404, {"error": "Not found"})
            return
        token = self.headers.get("authorization", "").removeprefix("Bearer ").strip()
        self.server.asked.append(hashlib.sha256(token.encode()).hexdigest())
        self.server._answering.wait(HANG_AT_MOST_S)
        if (name := self.server.accounts.get(token)) is None:
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return
        self._reply(200, {"type": "user", "name": name, "fullname": name.title(), "avatarUrl": "/avatars/x.svg"})

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:  # quiet: a test reads `asked`
        pass


HUB = StandInHub()
threading.Thread(target=HUB.serve_forever, daemon=True, name="hub-standin").start()
os.environ["HF_ENDPOINT"] = HUB.url
