#!/usr/bin/env bash
# SuperNode authentication: make a SuperNode key pair (if there is none yet) and register its
# public key with a SuperLink started with `superlink.sh --auth`.
#
#   scripts/deploy/register-supernode.sh KEY [CONNECTION]
#
#   KEY          path of the SuperNode's private key, e.g. keys/sn1 (the public key is KEY.pub).
#                If KEY does not exist, an ECDSA P-384 pair is made:
#                  ssh-keygen -t ecdsa -b 384 -N "" -f KEY
#   CONNECTION   the SuperLink connection in $FLWR_HOME/config.toml (see add-connection.sh);
#                default: the config's default connection
#
# Then start that SuperNode with the private key:
#   AUTH_KEY=keys/sn1 scripts/deploy/supernode.sh 0 2
#
# Two machines: make the pair ON the SuperNode's machine (the private key never leaves it),
# copy only KEY.pub to the machine where you run `flwr`, and register it there:
#   flwr supernode register keys/sn1.pub CONNECTION
# A SuperNode whose key is not registered is refused ("Failed to initialize the connection
# to the SuperLink") and never receives work. Undo with `flwr supernode unregister NODE_ID`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if ! command -v flwr >/dev/null && [[ -f "$repo/.venv/bin/activate" ]]; then
  # shellcheck source=/dev/null
  source "$repo/.venv/bin/activate"
fi

if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  echo "usage: $0 KEY [CONNECTION]" >&2
  exit 2
fi
key="$1"
connection=("${@:2}")

if [[ ! -f "$key" ]]; then
  mkdir -p "$(dirname "$key")"
  ssh-keygen -q -t ecdsa -b 384 -N "" -f "$key"
  echo "Made SuperNode key pair $key (private, keep it on the SuperNode) and $key.pub"
fi
flwr supernode register "$key.pub" "${connection[@]}"
