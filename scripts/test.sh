#!/usr/bin/env bash
# Set up, then run the linters and the whole test suite (real FashionMNIST, real `flwr run`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
