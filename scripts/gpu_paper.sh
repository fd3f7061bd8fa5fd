#!/usr/bin/env bash
# The paper-scale comparison on ONE GPU machine without internet or package index: the `paper`
# preset on FashionMNIST, vanilla / prox / int8 uplink, non-IID (Dirichlet 0.1), through
# Flower's deployment engine on loopback (one SuperLink, NUM_NODES SuperNodes sharing the GPU),
# plus a training-throughput benchmark of the 32 px `paper` preset (35.7 M parameters).
#
# Here first:  python -m feddm_flower.tools.gpu_kit pack        (gpu-kit/: wheels + FashionMNIST)
# There, from the repository root with gpu-kit/ beside it:
#   scripts/gpu_paper.sh
# Back here:   python -m feddm_flower.tools.gpu_kit fid gpu-paper.tar.gz     (FID/KID table)
#
# It installs the kit's wheels (--no-deps, into SITE, on top of the machine's own torch),
# unpacks FashionMNIST, starts a SuperLink and NUM_NODES SuperNodes, each with its node worker
# (scripts/deploy/supernode.sh: imports, data, U-Net and CUDA stay alive between messages) and
# an equal share of the CPU cores, runs one `flwr run` per cell, samples each cell's final
# model into samples.npz, prints per round the share of the wall time spent outside client
# training and where it went, then runs the training-throughput benchmark (ours eager, a plain
# diffusers loop, ours compiled) with what is left of the budget, and packs the light results
# (metrics, logs, samples, benchmark; no weights) into gpu-paper.tar.gz. With $OUT set,
# gpu-paper.tar.gz, summary.json and gpu_paper.log are copied there. Nothing here computes FID.
# Every phase prints a timestamped line, so a run cut short still says where its time went.
#
# Environment (defaults in brackets):
#   KIT [gpu-kit]  SITE [/tmp/feddm-gpu-site]  SKIP_INSTALL [0]: 1 = use this environment as is
#   WORK [$OUT-less: outputs/gpu; else /tmp/feddm-gpu-work]   DATA_ROOT [~/.cache/feddm-flower/data]
#   CELLS ["vanilla prox int8"]  NUM_NODES [4]  ROUNDS [3]  STEPS [200] local steps per round
#   BATCH [128]  LR [5e-4]  ALPHA [0.1]  PRESET [paper]  DEVICE [cuda]  MIXED_PRECISION [bf16]
#   CHANNELS_LAST [true]  WORKER [1]  THREADS [cores / NUM_NODES] per SuperNode
#   EXTRA_RUN_CONFIG [] appended to every cell's --run-config (one message per node and
#   round, the default: the train message measures the model it received; one evaluate
#   message after the last round; the server's global-loss measures every round)
#   SAMPLES [1000]  SAMPLE_STEPS [25] DDIM steps  SAMPLE_BATCH [500]
#   BENCH_PRESET [paper] BENCH_SIZE [32] BENCH_CHANNELS [3] BENCH_BATCH [256] BENCH_STEPS [60]
#   BENCH_WARMUP [10]  BENCH_COMPILE [1]: also time ours under torch.compile
#   BUDGET [560] seconds for the whole script: each cell gets an equal share of what is left
#   after BENCH_RESERVE [50] s for the benchmark, and one still running when its share is
#   spent is stopped (and sampled from its last checkpoint); the benchmark gets the rest
#   PORT [9092] SuperLink port; NODE_PORT [9094] first SuperNode port (one each, upwards)
set -euo pipefail
cd "$(dirname "$0")/.."

KIT=${KIT:-gpu-kit}
SITE=${SITE:-/tmp/feddm-gpu-site}
if [[ -n "${OUT:-}" ]]; then WORK=${WORK:-/tmp/feddm-gpu-work}; else WORK=${WORK:-outputs/gpu}; fi
DATA_ROOT=${DATA_ROOT:-$HOME/.cache/feddm-flower/data}
CELLS=${CELLS:-vanilla prox int8}
NUM_NODES=${NUM_NODES:-4}
THREADS=${THREADS:-$(($(nproc) / NUM_NODES > 0 ? $(nproc) / NUM_NODES : 1))}
BUDGET=${BUDGET:-560}
BENCH_RESERVE=${BENCH_RESERVE:-50}
PORT=${PORT:-9092}
NODE_PORT=${NODE_PORT:-9094}

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
rm -rf "$WORK/cells" "$WORK/flwr-home" "$WORK"/*.json "$WORK"/*.log "$WORK/gpu-paper.tar.gz"
mkdir -p "$WORK/cells" "$WORK/logs"
exec > >(tee -a "$WORK/gpu_paper.log") 2>&1
say() { echo "[gpu_paper $(printf '%4d' "$SECONDS") s] $*"; }

# --- processes: every one started here is stopped, with its descendants, on exit -----------
pids=()
tree() { # a pid and all its descendants
  local table todo=("$1") p child parent
  if command -v ps >/dev/null; then
    table=$(ps -eo pid=,ppid=)
  else # a bare image: read the parents from /proc
    table=$(grep -H '^PPid:' /proc/[0-9]*/status 2>/dev/null |
      sed -E 's#^/proc/([0-9]+)/status:PPid:[[:space:]]*#\1 #')
  fi
  while ((${#todo[@]})); do
    p=${todo[0]} && todo=("${todo[@]:1}") && echo "$p"
    while read -r child parent; do
      [[ "$parent" == "$p" ]] && todo+=("$child")
    done <<<"$table"
  done
}
stop_all() {
  local all=() p
  for p in "${pids[@]}"; do mapfile -t -O "${#all[@]}" all < <(tree "$p"); done
  ((${#all[@]})) || return 0
  kill -STOP "${all[@]}" 2>/dev/null || true # none may start another in between
  kill -KILL "${all[@]}" 2>/dev/null || true
}
finish() {
  local status=$?
  stop_all
  if [[ -n "${OUT:-}" ]]; then
    for f in gpu-paper.tar.gz summary.json gpu_paper.log; do
      [[ -f "$WORK/$f" ]] && cp "$WORK/$f" "$OUT/"
    done
  fi
  exit "$status"
}
trap finish EXIT
wait_for() { # wait_for SECONDS FILE PATTERN: until the log FILE shows PATTERN
  local deadline=$((SECONDS + $1))
  until grep -qE "$3" "$2" 2>/dev/null; do
    if ((SECONDS > deadline)); then
      say "timed out waiting for '$3' in $2:" && tail -n 30 "$2"
      return 1
    fi
    sleep 0.5
  done
}

# --- install and data --------------------------------------------------------------------
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  say "installing $(find "$KIT/wheels" -name '*.whl' | wc -l) wheels from $KIT/wheels into $SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" "$KIT"/wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  python3 -m pip check 2>&1 | grep -v '^flwr .* requires uv' | head -n 20 || true # info only
fi
if [[ -f "$KIT/data/train-images-idx3-ubyte.gz" ]]; then
  mkdir -p "$DATA_ROOT/FashionMNIST/raw"
  for f in "$KIT"/data/*-ubyte.gz; do
    gunzip -c "$f" >"$DATA_ROOT/FashionMNIST/raw/$(basename "$f" .gz)"
  done
  say "FashionMNIST unpacked into $DATA_ROOT/FashionMNIST/raw"
fi
export FLWR_HOME="$WORK/flwr-home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 # nothing to fetch, and no network to try
python3 - >"$WORK/environment.json" <<'PY'
import json, os, platform, subprocess
import diffusers, flwr, torch
gpu = torch.cuda.is_available()
smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True) if gpu else None
print(json.dumps({
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "flwr": flwr.__version__, "diffusers": diffusers.__version__, "cpus": os.cpu_count(),
    "gpu": torch.cuda.get_device_name(0) if gpu else None, "nvidia-smi": smi and smi.stdout.strip(),
}))
PY
say "environment: $(cat "$WORK/environment.json")"

# --- every cell's run-config, checked before anything starts ------------------------------
declare -A cell_keys=(
  [vanilla]="strategy='vanilla'"
  [prox]="strategy='prox'"
  [int8]="strategy='quant' uplink='int8'"
)
common="model-preset='${PRESET:-paper}' device='${DEVICE:-cuda}'"
common+=" mixed-precision='${MIXED_PRECISION:-bf16}' channels-last=${CHANNELS_LAST:-true}"
common+=" partitioning='dirichlet' dirichlet-alpha=${ALPHA:-0.1} num-server-rounds=${ROUNDS:-3}"
common+=" local-steps=${STEPS:-200} batch-size=${BATCH:-128} learning-rate=${LR:-5e-4}"
common+=" min-nodes=$NUM_NODES eval-every=0 seed=0 data-root='$DATA_ROOT'"
# The kit carries no tensorboard (too large for it): metrics.jsonl holds every scalar.
common+=" tensorboard=false"
for cell in $CELLS; do
  [[ -n "${cell_keys[$cell]:-}" ]] || { say "unknown cell '$cell' (vanilla, prox, int8)"; exit 2; }
  python3 -m feddm_flower.app.overrides "$common ${cell_keys[$cell]} ${EXTRA_RUN_CONFIG:-}" || exit 2
done

# --- the federation: one SuperLink, NUM_NODES SuperNodes, all on this machine --------------
start() { # start NAME COMMAND...: in the background, logging to logs/NAME.log
  local name=$1 && shift
  "$@" >"$WORK/logs/$name.log" 2>&1 &
  pids+=("$!")
  disown "$!" # stopped by stop_all; no job notices from bash
}
start superlink env HOST=127.0.0.1 PORT="$PORT" STATE_DIR= INSECURE=1 scripts/deploy/superlink.sh
wait_for 90 "$WORK/logs/superlink.log" "Uvicorn running on"
for ((i = 0; i < NUM_NODES; i++)); do
  start "supernode-$i" env SUPERLINK="127.0.0.1:$PORT" PORT=$((NODE_PORT + i)) INSECURE=1 \
    WORKER="${WORKER:-1}" NUM_THREADS="$THREADS" scripts/deploy/supernode.sh "$i" "$NUM_NODES"
done
for ((i = 0; i < NUM_NODES; i++)); do
  wait_for 120 "$WORK/logs/supernode-$i.log" "SuperNode ID: [0-9]+"
done
scripts/deploy/add-connection.sh gpu "127.0.0.1:$PORT" --insecure >/dev/null 2>&1
say "SuperLink on 127.0.0.1:$PORT with $NUM_NODES SuperNodes"

# --- the cells ------------------------------------------------------------------------------
read -ra cells <<<"$CELLS"
for ((c = 0; c < ${#cells[@]}; c++)); do
  cell=${cells[c]}
  dir="$WORK/cells/$cell"
  mkdir -p "$dir"
  declare -A offset=()
  for ((i = 0; i < NUM_NODES; i++)); do offset[$i]=$(stat -c %s "$WORK/logs/supernode-$i.log"); done
  # An equal share of what is left, less 30 s per cell for sampling and the report: if the
  # cells run slower than planned, each is cut at about the same point.
  remaining=$((${#cells[@]} - c))
  left=$(((BUDGET - SECONDS - BENCH_RESERVE - 30 * remaining) / remaining))
  if ((left < 30)); then
    say "cell $cell: skipped, the budget ($BUDGET s) is spent" && continue
  fi
  say "cell $cell: flwr run (at most $left s)"
  status=0
  timeout "$left" flwr run . gpu --stream \
    --run-config "$common ${cell_keys[$cell]} output-dir='$dir/run' ${EXTRA_RUN_CONFIG:-}" \
    >"$dir/flwr.log" 2>&1 || status=$?
  grep -E "Round [0-9]+: train-loss|FedDM run finished|ERROR" "$dir/flwr.log" || true
  if ((status == 124)); then
    run=$(grep -oE "Successfully started run [0-9]+" "$dir/flwr.log" | grep -oE "[0-9]+$" || true)
    say "cell $cell: out of time; stopping run ${run:-?}"
    [[ -n "$run" ]] && flwr stop "$run" gpu >/dev/null 2>&1 || true
    sleep 5
  fi
  for ((i = 0; i < NUM_NODES; i++)); do
    tail -c +$((offset[$i] + 1)) "$WORK/logs/supernode-$i.log" >"$dir/supernode-$i.log"
  done
  model="$dir/run/pipeline"
  [[ -d "$model" ]] || model="$dir/run/checkpoint"
  if [[ -d "$model" ]]; then
    timeout 120 python3 -m feddm_flower.tools.gpu_kit sample "$model" --out "$dir/samples.npz" \
      --num "${SAMPLES:-1000}" --steps "${SAMPLE_STEPS:-25}" \
      --batch-size "${SAMPLE_BATCH:-500}" --device "${DEVICE:-cuda}" ||
      say "cell $cell: sampling failed"
  else
    say "cell $cell: no model to sample (no round finished)"
  fi
done
stop_all
pids=()

# --- throughput benchmark: ours (eager, then compiled) beside a plain loop, one process ---
bench() { # bench NAME SECONDS [extra flags]
  local name=$1 limit=$2 && shift 2
  say "benchmark $name: ${BENCH_STEPS:-60} training steps of the ${BENCH_PRESET:-paper} preset (at most $limit s)"
  timeout "$limit" python3 -m feddm_flower.tools.bench train-speed \
    --preset "${BENCH_PRESET:-paper}" --image-size "${BENCH_SIZE:-32}" \
    --channels "${BENCH_CHANNELS:-3}" --batch-size "${BENCH_BATCH:-256}" \
    --steps "${BENCH_STEPS:-60}" --warmup "${BENCH_WARMUP:-10}" \
    --mixed-precision "${MIXED_PRECISION:-bf16}" --device "${DEVICE:-cuda}" --channels-last \
    --out "$WORK/bench.json" "$@" >/dev/null || say "benchmark $name ended early (exit $?)"
  [[ -f "$WORK/bench.json" ]] && grep -E '"(img_per_s|vs_plain|peak_share|pass)"' "$WORK/bench.json"
}
left=$((BUDGET - SECONDS - 10))
compile=()
[[ "${BENCH_COMPILE:-1}" == 1 ]] && compile=(--compile)
if ((left > 30)); then
  bench all "$left" "${compile[@]}"
else
  say "benchmark skipped: the budget ($BUDGET s) is spent"
fi

# --- report and the results to take home ----------------------------------------------------
python3 -m feddm_flower.tools.gpu_kit report "$WORK"
light=(cells logs summary.json environment.json gpu_paper.log)
[[ -f "$WORK/bench.json" ]] && light+=(bench.json)
tar -czf "$WORK/gpu-paper.tar.gz" -C "$WORK" --exclude=checkpoint --exclude=pipeline \
  --exclude='.*' "${light[@]}"
say "results: $WORK/gpu-paper.tar.gz ($(du -h "$WORK/gpu-paper.tar.gz" | cut -f1))"
