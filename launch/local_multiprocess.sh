#!/usr/bin/env bash
# Starts a multi-process training job on this machine: NUM_PROCESSES processes of
# `python -m launch.train`, each with DEVICES_PER_PROCESS simulated CPU devices
# (XLA_FLAGS=--xla_force_host_platform_device_count), joined through a coordinator on
# localhost at a free port (jax.distributed, gloo collectives on CPU).
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- <launch.train arguments>
#   launch/local_multiprocess.sh 2 4 -- --config configs/train.py:llava15_7b_mod0.3,tiny --workdir /tmp/run
#
# Output lines are prefixed with [p<index>]. The script waits for every process and
# exits 0 only if all exit 0. When one exits with an error the others are sent SIGTERM,
# then SIGKILL after KILL_GRACE seconds (default 10), and the script exits with the
# failed process's status and a message naming it: a job never hangs on a dead peer.
# Environment: PYTHON (default .venv/bin/python if present, else python3), KILL_GRACE,
# HEARTBEAT_TIMEOUT (seconds, passed as --heartbeat-timeout; default 30),
# JAX_PLATFORMS (default cpu; set it to "" to let jax pick the accelerators).
set -u -o pipefail

usage() { echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- <launch.train arguments>" >&2; exit 64; }
[[ $# -ge 2 ]] || usage
NUM_PROCESSES=$1; DEVICES=$2; shift 2
[[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]] || usage
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
KILL_GRACE=${KILL_GRACE:-10}
HEARTBEAT_TIMEOUT=${HEARTBEAT_TIMEOUT:-30}
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export JAX_PLATFORMS=${JAX_PLATFORMS-cpu}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}"

declare -a PIDS=()
declare -A INDEX_OF=()

stop_all() {  # SIGTERM the processes still running, SIGKILL them after KILL_GRACE seconds
  local pid alive waited=0
  (( ${#PIDS[@]} )) || return 0
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  while (( waited < KILL_GRACE * 10 )); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1; waited=$((waited + 1))
  done
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "local_multiprocess: process ${INDEX_OF[$pid]} (pid $pid) ignored SIGTERM for ${KILL_GRACE}s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  done
}
forget() {  # drop a finished pid from PIDS
  local pid kept=()
  for pid in "${PIDS[@]}"; do [[ "$pid" != "$1" ]] && kept+=("$pid"); done
  PIDS=("${kept[@]}")
}
trap 'echo "local_multiprocess: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

echo "local_multiprocess: $NUM_PROCESSES process(es) x $DEVICES device(s), coordinator 127.0.0.1:$PORT" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  "$PYTHON" -u -m launch.train --coordinator-address="127.0.0.1:$PORT" --num-processes="$NUM_PROCESSES" \
      --process-id="$i" --heartbeat-timeout="$HEARTBEAT_TIMEOUT" "$@" \
      > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  PIDS+=("$!")
  INDEX_OF[$!]=$i
done

status=0
remaining=$NUM_PROCESSES
while (( remaining > 0 )); do
  finished=""
  wait -n -p finished "${PIDS[@]}"
  code=$?
  [[ -z "$finished" ]] && break  # nothing left to wait for
  remaining=$((remaining - 1))
  if (( code != 0 )); then
    echo "local_multiprocess: error: process ${INDEX_OF[$finished]} (pid $finished) exited with status $code;" \
         "stopping the other processes" >&2
    forget "$finished"
    failed_at=$SECONDS
    stop_all
    wait 2>/dev/null
    echo "local_multiprocess: the other processes ended $((SECONDS - failed_at))s after process" \
         "${INDEX_OF[$finished]} failed" >&2
    status=$code
    break
  fi
  forget "$finished"
done
wait 2>/dev/null  # the output filters
if (( status == 0 )); then
  echo "local_multiprocess: all $NUM_PROCESSES process(es) finished" >&2
fi
exit "$status"
