# Sourced by the set-up scripts: creates .venv with Python 3.11+ if needed and activates it.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: weit_jax needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian splits venv out of python3.
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
      echo "error: '$PYTHON -m venv' failed; install it with: sudo apt-get install python3-venv" >&2
      exit 2
    fi
    rm -rf .venv && "$PYTHON" -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
source .venv/bin/activate
