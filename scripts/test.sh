#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the checks and the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k scheduler
#   scripts/test.sh --repeat N [pytest args]   run the integration suites (or the given tests)
#                                              N times and print a per-test pass count
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [[ ${1:-} == --repeat ]]; then
  [[ $# -ge 2 ]] || { echo "usage: scripts/test.sh --repeat N [pytest args]" >&2; exit 2; }
  runs=$2; shift 2
  exec .venv/bin/python scripts/repeat_tests.py "$runs" "$@"
fi
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest -q -ra "$@"
