#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite. Extra arguments go to pytest.
#
# Variables, default in brackets:
#   VENV  [.venv] the virtualenv run_scripts/setup.sh creates and the tests run in
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
opsd_help "${BASH_SOURCE[0]}" "$@"
cd "$OPSD_ROOT"
WITH_TEST_EXTRAS=1 bash run_scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest tests "$@"
