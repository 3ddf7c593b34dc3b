"""Orbax checkpoints: one step directory holding the train state, the Grain iterator state and a
JSON `meta` (resolved config, model config, LoRA settings, base-model fingerprint).

Orbax writes each step to a temporary directory and renames it when complete, so a crash during a
save leaves nothing that `latest_step()` would pick up. LoRA runs store only the trainable leaves
plus the base's identity; the base is reloaded from `model.source` and must match its fingerprint.
"""

import dataclasses
import hashlib
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxtele.errors import JaxteleError
from jaxtele.run import RunDir


def fingerprint(tree) -> str:
  """A cheap identity for a parameter tree: paths, shapes, dtypes and a strided sample of values."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(tree), key=lambda kv: jax.tree_util.keystr(kv[0])):
    x = np.asarray(jax.device_get(leaf)).reshape(-1)
    h.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
    h.update(np.ascontiguousarray(x[:: max(1, x.size // 4096)]).astype(np.float32).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class KeepSteps:
  """Orbax preservation policy: keep the steps in `steps`, a set its owner updates (the frontier)."""
  steps: set

  def should_preserve(self, checkpoints, *, context):
    return [c.step in self.steps for c in checkpoints]


class Checkpointer:
  """`keep` latest steps, plus any step in `self.protected` (frontier checkpoints): keep-last-N never deletes them."""

  def __init__(self, run_dir: str, keep: int, async_save: bool = True):
    self.directory = RunDir(run_dir).checkpoints
    self.protected = set()
    policies = ocp.checkpoint_managers.preservation_policy
    keeping = policies.AnyPreservationPolicy([policies.LatestN(keep), KeepSteps(self.protected)])
    options = ocp.CheckpointManagerOptions(preservation_policy=keeping, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, meta: dict):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                              meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, data_iter, expected_meta: dict):
    """Restore onto the shardings in `abstract_state` (any mesh, any process count) and, unless
    `data_iter` is None, the iterator's position; refuse a checkpoint of another model."""
    check_compatible(self.read_meta(step), expected_meta, f"{self.directory}/{step}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_params(self, step: int, params, cfg):
    """Only the trainable parameters of a step, as host arrays (export, evaluation); `params` gives their
    structure and the run's optimizer config the structure of the state they were saved in."""
    from jaxtele.optimizer import run_optimizer
    from jaxtele.step import init_state

    tx, _ = run_optimizer(cfg)
    abstract = jax.eval_shape(lambda p: init_state(p, tx), params)
    state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return jax.device_get(state["params"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


IDENTITY_KEYS = ("model", "mode", "lora", "base_fingerprint")


def run_meta(cfg, model_cfg, frozen, data_seed: int) -> dict:
  """What identifies a run's checkpoints (a restore must match `IDENTITY_KEYS`), and what resuming needs."""
  from jaxtele.models.lora import lora_meta

  lora = lora_meta(cfg.lora) if cfg.train.mode == "lora" else None
  runtime = ("remat", "dtype", "attention", "scan_layers")
  model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in runtime}
  meta = {"model": model, "mode": cfg.train.mode, "lora": lora,
          "base_fingerprint": fingerprint(frozen) if cfg.train.mode == "lora" else None,
          "base_source": cfg.model.source, "process_count": jax.process_count(), "data_seed": data_seed,
          "config": cfg.to_dict()}
  return json.loads(json.dumps(meta, default=str))  # compare as it will read back from JSON


def check_compatible(saved: dict, expected: dict, where: str):
  for key in IDENTITY_KEYS:
    if saved.get(key) != expected.get(key):
      raise JaxteleError(f"{where}: checkpoint {key} differs from this run's "
                         f"({_diff(saved.get(key), expected.get(key))}); use another run_dir or the matching config")


def _diff(a, b) -> str:
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      if a.get(k) != b.get(k):
        return f"{k}: checkpoint {a.get(k)!r}, run {b.get(k)!r}"
  return f"checkpoint {json.dumps(a)[:80]}, run {json.dumps(b)[:80]}"
