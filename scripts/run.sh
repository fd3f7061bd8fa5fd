#!/usr/bin/env bash
# Set up, then train FedDM on real FashionMNIST with `flwr run .` on Flower's simulation engine
# (2 SuperNodes, 1 CPU each). Extra arguments go to `flwr run`, e.g.
#   scripts/run.sh --run-config "strategy='vanilla' num-server-rounds=10"
# NUM_SUPERNODES (default 2) simulated nodes; NUM_GPUS (default 0) GPUs per ClientApp, e.g. 0.5.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate

# A project-local Flower home keeps this run's SuperLink apart from any other Flower setup.
export FLWR_HOME="$PWD/.flwr"
# Dependencies are installed in .venv above; the SuperLink must not `uv sync` them per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
stop_superlink() { pkill -f "flower-superlink.*$FLWR_HOME" || true; }
trap stop_superlink EXIT

flwr run . --stream \
  --federation-config "num-supernodes=${NUM_SUPERNODES:-2} client-resources-num-cpus=1 client-resources-num-gpus=${NUM_GPUS:-0}" \
  --run-config "output-dir='$PWD/outputs/$(date +%Y%m%d-%H%M%S)'" \
  "$@"
