#!/usr/bin/env bash
# N processes of `python -m jaxtele.train` on this machine, joined through jax.distributed.
# On a CPU-only machine each process gets DEVICES emulated CPU devices (cross-process collectives: gloo).
#
#   launch/local_multiprocess.sh 2 4 --config configs/quickstart.py --config.run_dir=runs/mp
#
# Exits non-zero if any process fails; the others are then stopped. PYTHON picks the interpreter.
set -euo pipefail
py=${PYTHON:-python}
n=${1:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config FILE [--config.key=value ...]}
devices=${2:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config FILE [...]}
shift 2
port=${JAXTELE_PORT:-$((20000 + RANDOM % 20000))}
export JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="$n"
if "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "cpu")' 2>/dev/null; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
fi  # on accelerators each process uses the devices it sees
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID=$i "$py" -m jaxtele.train "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
trap - EXIT
exit "$status"
