"""Orbax checkpoints: one step directory holding the trainable parameters, the optimizer state, the step, the
Grain iterator state and a JSON `meta` (resolved config, model config, LoRA settings, base-model fingerprint),
each a separate Orbax item, so export and evaluation restore the parameters without building an optimizer.
A step written before the split (one `state` item) is read as it was: resumed whole, or its parameters alone.

Orbax writes each step to a temporary directory and renames it when complete, so a crash during a
save leaves nothing that `latest_step()` would pick up. LoRA runs store only the trainable leaves
plus the base's identity; the base is reloaded from `model.source` and must match its fingerprint.
"""

import dataclasses
import hashlib
import json
import os

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


ITEMS = ("params", "opt_state", "step", "data", "meta")  # each its own Orbax item: parameters restore alone
LEGACY_STATE = "state"  # before: params, opt_state and step in one item (read, never written)


class Checkpointer:
  """`keep` latest steps, plus any step in `self.protected` (frontier checkpoints): keep-last-N never deletes them."""

  def __init__(self, run_dir: str, keep: int, async_save: bool = True):
    self.directory = RunDir(run_dir).checkpoints
    self.protected = set()
    policies = ocp.checkpoint_managers.preservation_policy
    keeping = policies.AnyPreservationPolicy([policies.LatestN(keep), KeepSteps(self.protected)])
    options = ocp.CheckpointManagerOptions(preservation_policy=keeping, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS + (LEGACY_STATE,))

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, meta: dict):
    """One step: the train state split into its items, the iterator's position and the JSON meta."""
    args = ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                              opt_state=ocp.args.StandardSave(state["opt_state"]),
                              step=ocp.args.JsonSave({"step": int(step)}),
                              data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta))
    self.manager.save(step, args=args, force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def legacy(self, step: int) -> bool:
    """A step written before the train state was split into items (migrated on read)."""
    return self.legacy_dir(os.path.join(self.directory, str(step)))

  @staticmethod
  def legacy_dir(step_dir: str) -> bool:
    return os.path.isdir(os.path.join(step_dir, LEGACY_STATE))

  def restore(self, step: int, abstract_state, data_iter, expected_meta: dict):
    """Restore onto the shardings in `abstract_state` (any mesh, any process count) and, unless
    `data_iter` is None, the iterator's position; refuse a checkpoint of another model."""
    check_compatible(self.read_meta(step), expected_meta, f"{self.directory}/{step}")
    if self.legacy(step):
      items = {LEGACY_STATE: ocp.args.StandardRestore(abstract_state)}
    else:
      items = {k: ocp.args.StandardRestore(abstract_state[k]) for k in ("params", "opt_state")}
      items["step"] = ocp.args.JsonRestore()
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if self.legacy(step):
      return out[LEGACY_STATE]
    sharding = abstract_state["step"].sharding  # a scalar on every device: any process can build it
    count = jax.make_array_from_callback((), sharding, lambda _: np.asarray(out["step"]["step"], np.int32))
    return {"step": count, "params": out["params"], "opt_state": out["opt_state"]}

  def restore_params(self, step: int, params):
    """Only the trainable parameters of a step, as host arrays (export, evaluation); `params` (arrays or
    ShapeDtypeStructs) gives their structure. No optimizer is built: its state is another item."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    if self.legacy(step):  # only the params subtree of the old single item
      where = os.path.join(self.directory, str(step), LEGACY_STATE)
      target = {"params": abstract}
      with ocp.PyTreeCheckpointer() as reader:
        state = reader.restore(where, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
      return jax.device_get(state["params"])
    restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    return jax.device_get(restored["params"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def saved_params(run_dir: str, step: int) -> dict:
  """A step's trainable parameters as stored, no structure given (host arrays): for inspection and tests."""
  item = LEGACY_STATE if Checkpointer.legacy_dir(RunDir(run_dir).step_dir(step)) else "params"
  with Checkpointer(run_dir, keep=1, async_save=False) as ckpt:
    out = ckpt.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()}))[item]
  return jax.device_get(out["params"] if item == LEGACY_STATE else out)


# Which model a checkpoint belongs to: a restore (resume, export, evaluation) must match these meta keys.
IDENTITY_KEYS = ("model", "mode", "lora", "base_fingerprint")
# The `lora` identity: what a LoRA run's checkpoint records about its adapters; a resume with other values is
# refused.
LORA_KEYS = {"rank": None, "alpha": None, "targets": None, "rslora": False, "extra_trainable": "", "variant": "lora",
             "dropout": 0.0, "plus_ratio": 0.0, "quantize_base": "none", "double_quant": False}
# Recorded only when set, so checkpoints written before these keys existed still resume.
LORA_KEYS_IF_SET = {"train_embeddings": False, "train_head": False, "embedding_lr": 0.0}


def lora_meta(lora_cfg) -> dict:
  """The `lora` identity read from the `lora` config section (defaults for keys a partial section lacks)."""
  meta = {k: lora_cfg.get(k, default) for k, default in LORA_KEYS.items()}
  return meta | {k: lora_cfg.get(k) for k, off in LORA_KEYS_IF_SET.items() if lora_cfg.get(k, off) != off}


def run_meta(cfg, model_cfg, frozen, data_seed: int) -> dict:
  """What identifies a run's checkpoints (a restore must match `IDENTITY_KEYS`), and what resuming needs."""
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
