#!/usr/bin/env bash
# Sets up a virtual environment (.venv) with the package and its test extras, then runs the tests.
# Works on a fresh Debian machine with Python 3.11+. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
python -m pip install --quiet -e '.[test]'
exec python -m pytest -q "$@"
