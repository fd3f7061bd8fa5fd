#!/usr/bin/env bash
# Set up, then train FedDM on real FashionMNIST with `flwr run .` on Flower's simulation engine
# (2 SuperNodes, 1 CPU each). Extra arguments go to `flwr run`, e.g.
#   scripts/run.sh --run-config "strategy='vanilla' num-server-rounds=10"
# NUM_SUPERNODES (default 2) simulated nodes; NUM_GPUS (default 0) GPUs per ClientApp, e.g. 0.5.
# Every --run-config is checked before Flower starts (python -m feddm_flower.app.overrides); the
# script exits non-zero unless the run finished (wrote summary.json into its run directory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate

# A project-local Flower home keeps this run's SuperLink apart from any other Flower setup
# (FEDDM_FLWR_HOME chooses another one, e.g. for tests).
export FLWR_HOME="${FEDDM_FLWR_HOME:-$PWD/.flwr}"
# Dependencies are installed in .venv above; the SuperLink must not `uv sync` them per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# Pre-flight: the run-config flwr will get (ours first, then every --run-config given), read
# as Flower reads it and validated, before Flower starts. Prints the run directory.
run_configs=("output-dir='$PWD/outputs/$(date +%Y%m%d-%H%M%S)'")
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --run-config | -c) run_configs+=("${args[i + 1]-}") && i=$((i + 1)) ;;
    --run-config=*) run_configs+=("${args[i]#--run-config=}") ;;
    -c?*) run_configs+=("${args[i]#-c}") ;;
  esac
done
run_dir=$(python -m feddm_flower.app.overrides --print-run-dir "${run_configs[@]}") || exit 2

stop_superlink() { pkill -f "flower-superlink.*$FLWR_HOME" || true; }
trap stop_superlink EXIT

started=$(date +%s)
status=0
flwr run . --stream \
  --federation-config "num-supernodes=${NUM_SUPERNODES:-2} client-resources-num-cpus=1 client-resources-num-gpus=${NUM_GPUS:-0}" \
  --run-config "${run_configs[0]}" \
  "$@" || status=$?

# `flwr run` exits 0 even when the ServerApp raised: the run finished only if it wrote a
# fresh summary.json (its very last step).
if [ -z "$run_dir" ]; then
  echo "note: output-dir='' (a fresh default directory): cannot check that the run finished" >&2
  exit "$status"
fi
summary="$run_dir/summary.json"
if [ ! -e "$summary" ] || [ "$(stat -c %Y "$summary")" -lt "$started" ]; then
  echo "run did not finish: no summary.json in $run_dir; see the log above" >&2
  exit 1
fi
exit "$status"
