#!/usr/bin/env bash
# N processes of `python -m jaxtele.train` on this machine, joined through jax.distributed.
# On a CPU-only machine each process gets DEVICES emulated CPU devices (cross-process collectives: gloo).
#
#   launch/local_multiprocess.sh 2 4 --config configs/quickstart.py --config.run_dir=runs/mp
#
# The first process to fail is named; the others stop on their own when they lose it (or are killed
# 30 s after their watchdog should have fired). The script exits with the first failure's status.
# PYTHON picks the interpreter.
set -uo pipefail
py=${PYTHON:-python}
n=${1:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config FILE [--config.key=value ...]}
devices=${2:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config FILE [...]}
shift 2
port=${JAXTELE_PORT:-$((20000 + RANDOM % 20000))}
export JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="$n"
if "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "cpu")' 2>/dev/null; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
fi  # on accelerators each process uses the devices it sees
declare -A rank
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID=$i "$py" -m jaxtele.train "$@" &
  pids+=($!)
  rank[$!]=$i
done
status=0
for ((left = n; left > 0; left--)); do
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  if ((rc != 0 && status == 0)); then
    status=$rc
    why="exit status $rc"
    ((rc > 128)) && why="killed by signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null))"
    echo "launch: process ${rank[$done_pid]} (pid $done_pid) failed: $why" >&2
    # The others notice a lost peer themselves (jaxtele/distributed.py watchdog); kill what is left after that.
    (sleep $(( ${JAXTELE_PEER_TIMEOUT:-45} + 30 )); kill -KILL "${pids[@]}" 2>/dev/null) &
  fi
done
trap - EXIT
exit "$status"
