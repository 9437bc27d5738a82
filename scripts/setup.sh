#!/usr/bin/env bash
# Set up a development environment in .venv: everything the apps, the tests and the tools need, pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, on its own: the exact CPU build, so nothing below can pull a CUDA one.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -r requirements.txt
