#!/usr/bin/env bash
# Set up (see setup.sh), make sure a headless Chromium is there for the page test, lint, and run the tests offline,
# in two parallel processes (pytest-xdist; each has its own Gradio cache folder: tests/conftest.py). An idle process
# takes tests from the other (worksteal), and the long tests go first, so both end together.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null; then
    sudo=$([ "$(id -u)" = 0 ] || echo sudo)
    $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -n "${TEST_PROCESSES:-2}" --dist worksteal "$@"
