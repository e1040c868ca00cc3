#!/usr/bin/env bash
# Sets up everything the embedded default needs on a fresh Debian machine (virtual environment,
# Debian's Fashion-MNIST package) and runs the runlocal pre-training to completion.
# Usage: bash scripts/run_local.sh [WORKDIR] [extra main.py flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-workdirs/pretrain}
shift || true
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist
  fi
fi
source scripts/_venv.sh
python -m pip install --quiet -e .
exec python main.py --config=configs/vit_pretrain.py:runlocal --workdir="$WORKDIR" "$@"
