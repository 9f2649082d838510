#!/usr/bin/env bash
# README command 2 (and CI): install into .venv with the test extras, lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/pytest "$@"
