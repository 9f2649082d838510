#!/usr/bin/env bash
# This machine's development install: .venv for the CPU with the given extras (e.g.
# `test`), through the install script every machine uses (scripts/install.sh).
set -euo pipefail
exec bash "$(dirname "$0")/install.sh" --accelerator cpu --extras "${1:-}" --venv .venv
