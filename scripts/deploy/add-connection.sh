#!/usr/bin/env bash
# Tell `flwr` (the CLI) how to reach a SuperLink: add a connection to $FLWR_HOME/config.toml
# (default ~/.flwr/config.toml), which is where Flower 1.42 keeps SuperLink connections.
#
#   scripts/deploy/add-connection.sh NAME HOST:PORT CA_CERT      (TLS, the default)
#   scripts/deploy/add-connection.sh NAME HOST:PORT --insecure   (SuperLink run with --insecure)
#
# e.g. scripts/deploy/add-connection.sh feddm 10.0.0.5:8000 certs/ca.crt
# writes
#   [superlink.feddm]
#   address = "10.0.0.5:8000"
#   root-certificates = "/abs/path/certs/ca.crt"     # must be an absolute path
# after which
#   flwr run . feddm --stream --run-config "num-server-rounds=10 output-dir='/data/runs/r1'"
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if ! command -v flwr >/dev/null && [[ -f "$repo/.venv/bin/activate" ]]; then
  # shellcheck source=/dev/null
  source "$repo/.venv/bin/activate"
fi

if [[ $# -ne 3 || ! "$1" =~ ^[A-Za-z0-9_-]+$ ]]; then
  echo "usage: $0 NAME HOST:PORT (CA_CERT | --insecure)" >&2
  exit 2
fi
name="$1"
address="$2"
config="${FLWR_HOME:-$HOME/.flwr}/config.toml"

if [[ "$3" == --insecure ]]; then
  security="insecure = true"
  echo "WARNING: connection '$name' without TLS: use only with a SuperLink on a trusted network" >&2
else
  [[ -f "$3" ]] || { echo "error: CA certificate $3 not found" >&2; exit 2; }
  security="root-certificates = \"$(cd "$(dirname "$3")" && pwd)/$(basename "$3")\""
fi

# Let flwr create its default config (with the `local` simulation connection) first.
[[ -f "$config" ]] || flwr config list >/dev/null
if grep -q "^\[superlink\.$name\]" "$config"; then
  echo "error: connection '$name' already exists in $config; edit or remove it there" >&2
  exit 1
fi
printf '\n[superlink.%s]\naddress = "%s"\n%s\n' "$name" "$address" "$security" >>"$config"
echo "Added connection '$name' ($address) to $config:"
flwr config list
