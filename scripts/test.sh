#!/usr/bin/env bash
# Sets up a virtual environment (.venv) with the package and its test extras, then runs the tests.
# Works on a fresh Debian machine with Python 3.11+. Extra arguments go to pytest.
# Two workers, one test file each at a time (--dist loadfile: a file's module fixtures are built
# once), the longest files first (tests/conftest.py); set WEIT_TEST_WORKERS=0 to run in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
python -m pip install --quiet -e '.[test]'
exec python -m pytest -q -n "${WEIT_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
