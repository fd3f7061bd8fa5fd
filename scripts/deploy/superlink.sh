#!/usr/bin/env bash
# Start the Flower SuperLink (the server side) on this machine, with TLS.
#
#   scripts/deploy/superlink.sh [--auth] [--insecure] [extra flower-superlink flags]
#
#   --auth       only SuperNodes whose public key was registered may connect
#                (`--enable-supernode-auth`; see register-supernode.sh). Needs TLS.
#   --insecure   no TLS: everything, model weights included, goes over the network unencrypted
#                and unauthenticated. Only for a trusted loopback/test network.
#                INSECURE=1 works too.
#
# Environment (defaults in brackets):
#   CERTS_DIR   [certs]     ca.crt, server.pem and server.key from make-certs.sh
#   HOST        [0.0.0.0]   interface to listen on (0.0.0.0 = all; 127.0.0.1 = this machine only)
#   PORT        [8000]      the one port for SuperNodes (Fleet API) and `flwr` (Control API)
#   STATE_DIR   [superlink-state]  where the SuperLink keeps its state (SQLite): runs, logs,
#                           SuperNodes and their registered keys. With it, a restarted SuperLink
#                           knows its SuperNodes again and they reconnect by themselves.
#                           STATE_DIR= (empty) keeps the state in memory: lost on restart, and
#                           the SuperNodes then shut down; a little less CPU (used by the tests).
#
# The SuperLink also starts the ServerApp of every run (a `flwr-serverapp` subprocess), so this
# machine writes the run's outputs (`output-dir`) and needs the app's Python dependencies.
set -euo pipefail

# flower-superlink starts flower-superexec and flwr-serverapp by name: use the app's venv.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if ! command -v flower-superlink >/dev/null && [[ -f "$repo/.venv/bin/activate" ]]; then
  # shellcheck source=/dev/null
  source "$repo/.venv/bin/activate"
fi

insecure="${INSECURE:-0}"
auth=0
extra=()
for arg in "$@"; do
  case "$arg" in
    --insecure) insecure=1 ;;
    --auth | --enable-supernode-auth) auth=1 ;;
    *) extra+=("$arg") ;;
  esac
done

certs="${CERTS_DIR:-certs}"
state="${STATE_DIR-superlink-state}"

args=(--host "${HOST:-0.0.0.0}" --port "${PORT:-8000}")
if [[ -n "$state" ]]; then
  mkdir -p "$state"
  args+=(--database "$state/superlink.db")
fi

# The app's dependencies (torch, diffusers, flwr-datasets, ...) are installed in this venv
# already. By default the SuperLink would `uv sync` them again for every run, which needs
# internet access and a few minutes; the ServerApp then runs in this environment instead.
args+=(--disable-runtime-dependency-installation)

if [[ "$insecure" == 1 ]]; then
  if [[ "$auth" == 1 ]]; then
    echo "error: --auth (SuperNode authentication) needs TLS; drop --insecure" >&2
    exit 2
  fi
  cat >&2 <<'WARN'
##########################################################################################
#  WARNING: SuperLink WITHOUT TLS (--insecure).                                            #
#  Model weights, metrics and run commands travel unencrypted and anyone who can reach     #
#  this port can join as a SuperNode or start runs. Use only on a trusted test network.    #
##########################################################################################
WARN
  args+=(--insecure)
else
  for f in ca.crt server.pem server.key; do
    if [[ ! -f "$certs/$f" ]]; then
      echo "error: $certs/$f not found; run scripts/deploy/make-certs.sh HOST_OR_IP $certs" >&2
      echo "       (or set CERTS_DIR; --insecure only for a trusted test network)" >&2
      exit 2
    fi
  done
  args+=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem")
  args+=(--ssl-keyfile "$certs/server.key")
  [[ "$auth" == 1 ]] && args+=(--enable-supernode-auth)
fi

echo "+ flower-superlink ${args[*]} ${extra[*]}" >&2
exec flower-superlink "${args[@]}" "${extra[@]}"
