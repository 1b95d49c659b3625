#!/usr/bin/env bash
# Rehearses a multi-host job on one machine: N processes of the main job, joined by
# jax.distributed over localhost, each with its share of fake CPU devices.
#   launch/local_multiprocess.sh 2 --config=configs/shapes.py:runlocal --workdir=runs/pod \
#       --config.mesh.shape.data=2 --config.mesh.shape.fsdp=4
# Process i gets JAX_COORDINATOR_ADDRESS=localhost:<free port>, JAX_NUM_PROCESSES=N,
# JAX_PROCESS_ID=i and TOTAL_DEVICES/N fake devices (TOTAL_DEVICES, default 8, must divide).
# JAX_PLATFORMS defaults to cpu. SIGTERM or SIGINT to this script reaches every process as
# SIGTERM (they agree on a step, save it and exit 143). The script reports each process's exit
# status and exits with the first nonzero one; processes still running GRACE_SECONDS (default
# 120) after a failure are killed.
set -uo pipefail
usage="usage: launch/local_multiprocess.sh NUM_PROCESSES [MAIN FLAGS...]"
num_processes=${1:?$usage}
shift
total_devices=${TOTAL_DEVICES:-8}
grace=${GRACE_SECONDS:-120}
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]] || (( total_devices % num_processes )); then
  echo "NUM_PROCESSES=$num_processes must be a positive divisor of TOTAL_DEVICES=$total_devices" >&2
  exit 2
fi
python=${PYTHON:-python3}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
per_process=$(( total_devices / num_processes ))

pids=()
declare -A index
for (( i = 0; i < num_processes; i++ )); do
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per_process" \
  JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$num_processes" \
  JAX_PROCESS_ID="$i" \
    "$python" -m vqdiffusion_jax.main --multihost "$@" &
  pids+=("$!")
  index[$!]=$i
done

forward() {
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
# Background processes of a script ignore SIGINT, so Ctrl-C reaches them as SIGTERM.
trap 'forward TERM' TERM INT

status=0
deadline=
while (( ${#pids[@]} > 0 )); do
  if [[ -n $deadline ]] && (( SECONDS >= deadline )); then
    echo "killing the processes still running ${grace}s after one exited with $status" >&2
    forward KILL
    deadline=
  fi
  sleep 1 &
  timer=$!
  finished=
  wait -n -p finished "${pids[@]}" "$timer"
  code=$?
  if [[ -z $finished ]]; then
    continue  # a trapped signal interrupted the wait
  fi
  if [[ $finished == "$timer" ]]; then
    continue
  fi
  kill "$timer" 2>/dev/null
  echo "local_multiprocess.sh: process ${index[$finished]} exited with status $code" >&2
  if (( code != 0 && status == 0 )); then
    status=$code
    deadline=$(( SECONDS + grace ))
  fi
  remaining=()
  for pid in "${pids[@]}"; do [[ $pid == "$finished" ]] || remaining+=("$pid"); done
  pids=("${remaining[@]}")
done
exit "$status"
