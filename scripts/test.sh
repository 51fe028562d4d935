#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the checks and the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k scheduler
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -q -ra "$@"
