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
#   WORKER      [1]                1 = start this node's long-lived worker first
#                                  (python -m feddm_flower.app.worker): it keeps the imports, the
#                                  data, the U-Net and CUDA between messages, so a round is not
#                                  spent starting processes; 0 = every message's ClientApp
#                                  process does all of that itself
#   NUM_THREADS [0]                torch CPU threads for this node (its share of the machine's
#                                  cores when several nodes share one; 0 = torch's default)
#
# This node's own settings, which win over the run's run-config (unset: the run decides):
#   NODE_DATA_ROOT, NODE_LATENT_CACHE_DIR, NODE_AUTOENCODER, NODE_DEVICE
#                                  node-config data-root, latent-cache-dir, autoencoder, device
#   NODE_STATE_DIR [~/.cache/feddm-flower/nodes]  where the node keeps its model copy and bases
#   RUN_PATHS   [allow]            refuse = answer a run that names data-root, latent-cache-dir
#                                  or autoencoder itself with an error reply (set them here)
#
# GPUs: run one SuperNode per GPU and pin each to its GPU, e.g. on a machine with 2 GPUs
#   CUDA_VISIBLE_DEVICES=0 scripts/deploy/supernode.sh 2 4 &
#   CUDA_VISIBLE_DEVICES=1 scripts/deploy/supernode.sh 3 4 &
# Each SuperNode's worker and ClientApp processes inherit CUDA_VISIBLE_DEVICES and see only its
# GPU (as cuda:0); run-config `device` 'auto' or 'cuda' trains there. Several SuperNodes may
# share one GPU.
#
# Data: the ClientApp reads FashionMNIST from NODE_DATA_ROOT, else run-config `data-root`
# (default ~/.cache/feddm-flower/data) on THIS machine; see docs/deployment.md.
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
# The SuperExec that starts each message's ClientApp looks for work every second by default.
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.1}"
node_config="partition-id=$partition num-partitions=$partitions"
threads="${NUM_THREADS:-0}"
[[ "$threads" =~ ^[0-9]+$ ]] || { echo "error: NUM_THREADS=$threads: a whole number" >&2; exit 2; }
if ((threads > 0)); then
  node_config+=" num-threads=$threads"
  export OMP_NUM_THREADS="$threads"
fi
# The node's own settings win over the run's (docs/deployment.md, "Per-node settings").
for pair in data-root:NODE_DATA_ROOT latent-cache-dir:NODE_LATENT_CACHE_DIR \
  autoencoder:NODE_AUTOENCODER device:NODE_DEVICE state-dir:NODE_STATE_DIR run-paths:RUN_PATHS; do
  key="${pair%%:*}" var="${pair#*:}"
  if [[ -n "${!var:-}" ]]; then node_config+=" $key='${!var}'"; fi
done
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python3 -m feddm_flower.app.node_settings \
  "$node_config" || exit 2
if [[ "${WORKER:-1}" == 1 ]]; then
  # The worker exits when its parent, this process (flower-supernode after the exec), ends.
  sockdir="$(mktemp -d "${TMPDIR:-/tmp}/feddm-worker.XXXXXX")"
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" python3 -m feddm_flower.app.worker \
    --socket "$sockdir/node.sock" --parent-pid $$ &
  for ((i = 0; i < 600; i++)); do
    [[ -S "$sockdir/node.sock" ]] && break
    kill -0 $! 2>/dev/null || { echo "error: the node worker did not start" >&2; exit 1; }
    sleep 0.2
  done
  [[ -S "$sockdir/node.sock" ]] || { echo "error: the node worker is not ready" >&2; exit 1; }
  node_config+=" worker='$sockdir/node.sock'"
fi
args+=(--node-config "$node_config")

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
