"""Multi-process start-up through `jax.distributed`.

The launch scripts export JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (local
multi-process, SLURM), or JAXTELE_DISTRIBUTED=auto where JAX detects the cluster itself (TPU VMs).
"""

import os

import jax


def initialize():
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # cross-process collectives on CPU need gloo
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("JAXTELE_DISTRIBUTED") == "auto":
    jax.distributed.initialize()


def is_main() -> bool:
  return jax.process_index() == 0
