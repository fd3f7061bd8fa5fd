#!/usr/bin/env bash
# Start one Flower SuperNode (a client) that trains on one partition of the data.
#
#   scripts/deploy/supernode.sh PARTITION_ID NUM_PARTITIONS [--insecure] [flower-supernode flags]
#
#   PARTITION_ID     0 .. NUM_PARTITIONS-1, different for every SuperNode of the federation
#   NUM_PARTITIONS   the number of SuperNodes the data is split over (the same on all of them)
#   --insecure       no TLS (the SuperLink must run with --insecure too): only for a trusted
#                    loopback/test network. INSECURE=1 works too.
#
# Environment (defaults in brackets):
#   SUPERLINK   [127.0.0.1:8000]   the SuperLink's address as host:port
#   CA_CERT     [certs/ca.crt]     the CA certificate from make-certs.sh (copy it here)
#   AUTH_KEY    []                 private key registered with the SuperLink
#                                  (register-supernode.sh); needed when it runs with --auth
#   PORT        [9094+PARTITION_ID]  local port of this SuperNode's runtime API, where its
#                                  ClientApp processes connect (127.0.0.1 only). Every SuperNode
#                                  on the same machine needs its own port.
#
# GPUs: run one SuperNode per GPU and pin each to its GPU, e.g. on a machine with 2 GPUs
#   CUDA_VISIBLE_DEVICES=0 scripts/deploy/supernode.sh 2 4 &
#   CUDA_VISIBLE_DEVICES=1 scripts/deploy/supernode.sh 3 4 &
# Each SuperNode's ClientApp processes inherit CUDA_VISIBLE_DEVICES and see only its GPU (as
# cuda:0). (This version's ClientApp still trains on the CPU: see docs/deployment.md.)
#
# Data: the ClientApp reads FashionMNIST from run-config `data-root` (default
# ~/.cache/feddm-flower/data) on THIS machine; see docs/deployment.md.
set -euo pipefail

# flower-supernode starts flower-superexec and flwr-clientapp by name: use the app's venv.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if ! command -v flower-supernode >/dev/null && [[ -f "$repo/.venv/bin/activate" ]]; then
  # shellcheck source=/dev/null
  source "$repo/.venv/bin/activate"
fi

if [[ $# -lt 2 || ! "$1" =~ ^[0-9]+$ || ! "$2" =~ ^[0-9]+$ || "$1" -ge "$2" ]]; then
  echo "usage: $0 PARTITION_ID NUM_PARTITIONS [--insecure] [flower-supernode flags]" >&2
  echo "       (0 <= PARTITION_ID < NUM_PARTITIONS)" >&2
  exit 2
fi
partition="$1"
partitions="$2"
shift 2

insecure="${INSECURE:-0}"
extra=()
for arg in "$@"; do
  case "$arg" in
    --insecure) insecure=1 ;;
    *) extra+=("$arg") ;;
  esac
done

args=(--superlink "${SUPERLINK:-127.0.0.1:8000}")
args+=(--port "${PORT:-$((9094 + partition))}")
args+=(--node-config "partition-id=$partition num-partitions=$partitions")

if [[ "$insecure" == 1 ]]; then
  cat >&2 <<'WARN'
##########################################################################################
#  WARNING: SuperNode WITHOUT TLS (--insecure).                                            #
#  It cannot tell the real SuperLink from an impostor, and model weights and data-derived  #
#  updates travel unencrypted. Use only on a trusted test network.                         #
##########################################################################################
WARN
  args+=(--insecure)
else
  ca="${CA_CERT:-certs/ca.crt}"
  if [[ ! -f "$ca" ]]; then
    echo "error: CA certificate $ca not found: copy ca.crt from the SuperLink machine" >&2
    echo "       (made by scripts/deploy/make-certs.sh) and set CA_CERT" >&2
    exit 2
  fi
  args+=(--root-certificates "$ca")
fi

if [[ -n "${AUTH_KEY:-}" ]]; then
  [[ -f "$AUTH_KEY" ]] || { echo "error: AUTH_KEY=$AUTH_KEY not found" >&2; exit 2; }
  args+=(--auth-supernode-private-key "$AUTH_KEY")
fi

echo "+ flower-supernode ${args[*]} ${extra[*]}" >&2
exec flower-supernode "${args[@]}" "${extra[@]}"
