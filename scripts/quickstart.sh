#!/usr/bin/env bash
# README command 1: install into .venv, then run the quickstart (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m ldm_jax.quickstart "$@"
