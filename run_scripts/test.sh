#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST_EXTRAS=1 bash run_scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest tests "$@"
