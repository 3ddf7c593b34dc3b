"""Multi-process start-up through `jax.distributed`, and a watchdog that stops a run whose peer died.

The launch scripts export JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (local
multi-process, SLURM), or JAXTELE_DISTRIBUTED=auto where JAX detects the cluster itself (TPU VMs).

Without the watchdog a process whose peer was killed waits inside a collective until JAX's coordination
service gives up (minutes, then a stack dump naming no one). Here every process publishes a heartbeat to
the coordinator's key-value store; a peer silent for `JAXTELE_PEER_TIMEOUT` seconds (default 45), or a
coordinator that stops answering, ends this process with exit status 3 and one line naming the lost process.
Checkpoints are written to a temporary directory and renamed when complete, so the last complete one stays
restorable.
"""

import os
import sys
import threading
import time

import jax

EXIT_PEER_LOST = 3
_done = threading.Event()


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
  if jax.process_count() > 1:
    start_watchdog(float(os.environ.get("JAXTELE_PEER_TIMEOUT", 45)))


def is_main() -> bool:
  return jax.process_index() == 0


def _client():
  from jax._src import distributed as jax_distributed

  return jax_distributed.global_state.client


def start_watchdog(timeout: float, interval: float = 2.0):
  client, me, n = _client(), jax.process_index(), jax.process_count()
  started = time.time()

  def lost(what: str):
    if _done.is_set():
      return
    print(f"error: process {me}: {what}; stopping this process (the last complete checkpoint stays restorable)",
          file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)

  def beat():
    last_seen = {p: time.time() for p in range(n) if p != me}
    previous = {}
    while not _done.is_set():
      try:
        client.key_value_set(f"jaxtele/alive/{me}", repr(time.time()), allow_overwrite=True)
        for p in last_seen:
          if _try_get(client, f"jaxtele/done/{p}") is not None:
            last_seen[p] = float("inf")  # finished cleanly: no longer expected to beat
            continue
          value = _try_get(client, f"jaxtele/alive/{p}")
          if value is not None and value != previous.get(p):
            previous[p], last_seen[p] = value, time.time()
          silent = time.time() - max(last_seen[p], started)
          if silent > timeout:
            lost(f"lost process {p} of {n} (no heartbeat for {silent:.0f} s: killed or hung)")
      except Exception as e:  # the coordinator (process 0) holds the store: losing it is losing process 0
        if me != 0:
          lost(f"lost the coordinator, process 0 of {n} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
      _done.wait(interval)

  threading.Thread(target=beat, name="jaxtele-watchdog", daemon=True).start()


def _try_get(client, key):
  try:
    return client.key_value_try_get(key)
  except Exception as e:
    if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
      return None
    raise


def silent_peers(wait: float = 6.0) -> list[int] | None:
  """Peers whose heartbeat does not move within `wait` seconds (None: the coordinator itself is gone)."""
  client, me, n = _client(), jax.process_index(), jax.process_count()
  try:
    before = {p: _try_get(client, f"jaxtele/alive/{p}") for p in range(n) if p != me}
    time.sleep(wait)
    after = {p: _try_get(client, f"jaxtele/alive/{p}") for p in before}
    return [p for p in before if after[p] == before[p] and _try_get(client, f"jaxtele/done/{p}") is None]
  except Exception:
    return None


def explain_failure(error: BaseException) -> str | None:
  """A multi-process run's collective failed: say which process was lost, in one line (None: single process)."""
  if jax.process_count() <= 1:
    return None
  me, n = jax.process_index(), jax.process_count()
  peers = silent_peers()
  cause = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
  if peers is None:
    who = f"lost the coordinator, process 0 of {n}"
  elif peers:
    who = "lost " + ", ".join(f"process {p}" for p in peers) + f" of {n}"
  else:
    return None  # every peer is alive: not a lost process
  return f"process {me}: {who} ({cause}); the last complete checkpoint stays restorable"


def finished():
  """This process ends cleanly: peers stop expecting its heartbeat."""
  if jax.process_count() > 1 and not _done.is_set():
    try:
      _client().key_value_set(f"jaxtele/done/{jax.process_index()}", "1", allow_overwrite=True)
    except Exception:
      pass
  _done.set()
