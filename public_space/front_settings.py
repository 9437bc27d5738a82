"""The public Space's settings: each one's variable, default and meaning, defined here once.

app.py takes its constants from here; README.md's table is `SETTINGS.table()` (tests/test_settings.py keeps it so),
and scripts/deploy.py reads the defaults it shows here. Variables and secrets reach the app as environment
variables; changing one on the Space restarts it.
"""

from __future__ import annotations

from environment import Settings

SETTINGS = Settings()

BACKEND = [
    target.strip()
    for target in SETTINGS.text(
        "BACKEND",
        "",
        "the private GPU Space, `owner/name`, or its URL; several, comma-separated, to spread visitors over them",
    ).split(",")
    if target.strip()
]
HF_TOKEN = SETTINGS.secret(
    "HF_TOKEN", "a fine-grained token that can read the backend Space (every one of them); sent as the relay's bearer"
)
BACKEND_WAKE_TIMEOUT = SETTINGS.number(
    "BACKEND_WAKE_TIMEOUT",
    180,
    "seconds to wait for a sleeping or restarting backend before a visitor is told it is not reachable",
)
BACKEND_RETRY_S = SETTINGS.number(
    "BACKEND_RETRY_S", 10, "a backend that failed is probed again after this many seconds, doubling up to 60"
)
MAX_SIDE = SETTINGS.count(
    "MAX_SIDE", 1024, "longer photos are scaled down to this many pixels before they are sent (the backend's limit)"
)
MAX_UPLOAD_MB = SETTINGS.number(
    "MAX_UPLOAD_MB", 10, "larger files are encoded again (JPEG) before they are sent (the backend's limit)"
)
MAX_MEGAPIXELS = SETTINGS.number(
    "MAX_MEGAPIXELS", 40, "larger photos are refused from their header, in the backend's words (the backend's limit)"
)
MAX_VISITORS = SETTINGS.count("MAX_VISITORS", 256, "requests relayed at once, each waiting in the backend's queue")
MAX_WAIT_S = SETTINGS.number(
    "MAX_WAIT_S",
    600,
    "a new photo is refused at once, with the wait in the sentence, while the line is longer than this "
    "(seconds until a photo sent now would be done); `0`: no cap",
)
MAX_JOBS_PER_VISITOR = SETTINGS.count(
    "MAX_JOBS_PER_VISITOR", 2, "an address's photos waiting or being worked on at once (`0`: no limit)"
)
VISITOR_RATE = SETTINGS.text(
    "VISITOR_RATE", "6/minute", "photos an address may send per sliding window (`20/hour`, …; empty: no limit)"
)
ACCOUNT_MAX_JOBS = SETTINGS.count(
    "ACCOUNT_MAX_JOBS",
    2,
    "a Hugging Face account's photos waiting or being worked on at once (signed in on the page, or a token from "
    "Python; `0`: no limit)",
)
ACCOUNT_RATE = SETTINGS.text(
    "ACCOUNT_RATE", "12/minute", "photos an account may send per sliding window (empty: no limit)"
)
TRUSTED_PROXY_HOPS = SETTINGS.count(
    "TRUSTED_PROXY_HOPS",
    0,
    "proxies in front that append to `X-Forwarded-For`; `scripts/deploy.py` sets `1` for Hugging Face's proxy; "
    "`0` believes none (the socket's address)",
)
KEEP_FILES_S = SETTINGS.number(
    "KEEP_FILES_S",
    600,
    "an upload stays this long after its visitor's last run on it, a result after its last fetch",
)
FILES_QUOTA_MB = SETTINGS.number(
    "FILES_QUOTA_MB",
    2048,
    "all kept uploads and results together, each counted as the disk counts it (whole blocks, at least one, and "
    "one for its folder); past it the least recently used go first",
)
VISITOR_FILES_MB = SETTINGS.number(
    "VISITOR_FILES_MB", 100, "one visitor's kept uploads; an upload past it is refused with a sentence"
)
VISITOR_FILES = SETTINGS.count(
    "VISITOR_FILES",
    50,
    "and at most this many of their uploads, however small: a flood of tiny files is refused like a large one "
    "(`0`: no bound on the number)",
)
RESULT_CACHE_ENTRIES = SETTINGS.count(
    "RESULT_CACHE_ENTRIES", 256, "finished results kept to answer a repeated request without the GPU (`0`: none)"
)
RESULT_CACHE_MB = SETTINGS.number("RESULT_CACHE_MB", 64, "and at most this many megabytes of their pictures")
METRICS_TOKEN = SETTINGS.secret(
    "METRICS_TOKEN",
    "the maintainer's bearer token for `GET /metrics` (Prometheus format; no visitor data); unset: no such route, "
    "and nothing is counted",
)
