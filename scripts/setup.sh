#!/usr/bin/env bash
# Set up everything feddm-flower needs on a fresh Debian machine: FashionMNIST from Debian's
# package, and a virtualenv (.venv) with the app and its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: no root; install Debian's dataset-fashion-mnist or set run-config data-root" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.feddm-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
