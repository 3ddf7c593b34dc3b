#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: the same command on every worker; JAX discovers the slice itself.
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config configs/qwen25_1p5b_lora_pretrain.py
#
# Assumes the repository is checked out at ~/jaxtele on every worker with `pip install -e .` and
# `pip install "jax[tpu]"` done (e.g. by a startup script).
set -euo pipefail
tpu=${1:?usage: $0 TPU_NAME ZONE --config FILE [--config.key=value ...]}
zone=${2:?usage: $0 TPU_NAME ZONE --config FILE [...]}
shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd ~/jaxtele && JAXTELE_DISTRIBUTED=auto python -m jaxtele.train${args}"
