"""What a run will hold, before it holds it (`python -m jaxtele.train ... --dry_run`): the resolved config,
the mesh, parameter counts, optimizer-state bytes and memory per device, from shapes alone.

Per device = parameters + frozen base + optimizer state + gradients (as sharded by the rules) + the train
step's temporaries from XLA's compiled memory analysis on this backend (activations, logits, workspace).
Compiled on the CPU the temporaries are an estimate of what a GPU/TPU build needs, not a measurement of it.
On GPU/TPU (or with `--dry_run_remat` anywhere) the step is also compiled once per `model.remat` policy, and
each policy's memory per device is printed against the device's memory (`--dry_run_remat=48`: against 48 GiB).
"""

import copy
import sys

import jax

from jaxtele import build
from jaxtele.accelerator import ACCELERATORS, mesh_context, resolve_base_dtype
from jaxtele.batch import abstract as abstract_batch
from jaxtele.config import print_config
from jaxtele.models.decoder import REMAT_POLICIES
from jaxtele.optimizer import run_optimizer
from jaxtele.sharding import Shardings, batch_sharding, bytes_per_device, make_mesh
from jaxtele.step import init_state, make_train_step

MiB, GiB = 2**20, 2**30


def plan(cfg, compile_step: bool = True, out=None, remat_policies=None, device_bytes=None) -> dict:
  """`remat_policies`: compile the step once per policy and print its memory per device (default: every
  policy on GPU/TPU, none on CPU); `device_bytes`: the memory to judge "fits" against (default: the device's)."""
  out = out or sys.stdout
  if remat_policies is None:
    remat_policies = REMAT_POLICIES if jax.default_backend() in ACCELERATORS else ()
  model_cfg = build.model_config(cfg.model)
  mesh = make_mesh(cfg.mesh)
  rules = Shardings(mesh, model_cfg.num_heads, model_cfg.num_kv_heads)
  with mesh_context(mesh):  # as in training: fused kernels and the chunked loss shard by it
    report = _memory(cfg, mesh, rules, compile_step)
    rows = {}
    for p in remat_policies:
      if p == "offload_dots" and jax.default_backend() == "cpu":
        continue  # pinned host memory is a GPU/TPU feature
      same = p == cfg.model.remat and compile_step
      rows[p] = report if same else _memory(_with_remat(cfg, p), mesh, Shardings(mesh, model_cfg.num_heads,
                                                                                  model_cfg.num_kv_heads), True)

  print("config:", file=out)
  print_config(cfg, file=out)
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s) "
        f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)", file=out)
  for line in rules.report():
    print(line, file=out)
  base = resolve_base_dtype(cfg.lora.base_dtype, cfg.model.dtype) if cfg.train.mode == "lora" else "-"
  print(f"resolved: model.dtype={model_cfg.dtype}, model.attention={model_cfg.attention}, "
        f"lora.base_dtype={base}", file=out)
  print(f"parameters: {report['trainable_params']:,} trainable / {report['total_params']:,} total "
        f"({cfg.train.mode})", file=out)
  print(f"optimizer state: {report['optimizer_state_bytes'] / MiB:,.1f} MiB", file=out)
  parts = ", ".join(f"{k} {v / MiB:,.1f}" for k, v in report["per_device"].items())
  print(f"memory per device: {report['per_device_total_bytes'] / MiB:,.1f} MiB ({parts} MiB)", file=out)
  if rows:
    report["remat"] = {p: r["per_device_total_bytes"] for p, r in rows.items()}
    _print_remat(rows, cfg.model.remat, device_bytes or _device_bytes(), out)
  return report


def _with_remat(cfg, policy):
  cfg = copy.deepcopy(cfg)
  cfg.model.remat = policy
  return cfg


def _memory(cfg, mesh, rules, compile_step):
  graphdef, params, frozen = build.abstract_split(cfg)
  tx, _ = run_optimizer(cfg)
  state = jax.eval_shape(lambda p: init_state(p, tx), params)
  state_sh, frozen_sh = rules.tree(state), rules.tree(frozen)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  report = {
      "trainable_params": count(params), "total_params": count(params) + count(frozen),
      "optimizer_state_bytes": nbytes(state["opt_state"]),
      "per_device": {"params": bytes_per_device(state["params"], state_sh["params"]),
                     "frozen": bytes_per_device(frozen, frozen_sh),
                     "optimizer": bytes_per_device(state["opt_state"], state_sh["opt_state"]),
                     "gradients": bytes_per_device(state["params"], state_sh["params"])},
  }
  if compile_step:
    B, T = cfg.data.batch_size, cfg.data.seq_len
    batch = abstract_batch(B, T, batch_sharding(mesh))
    abstract = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    step = jax.jit(make_train_step(graphdef, tx, cfg.train.grad_accum, cfg.train.loss, cfg.train.loss_chunk),
                   donate_argnums=(0,))
    compiled = step.lower(abstract(state, state_sh), abstract(frozen, frozen_sh), batch).compile()
    report["per_device"]["step_temporaries"] = int(compiled.memory_analysis().temp_size_in_bytes)
  report["per_device_total_bytes"] = sum(report["per_device"].values())
  return report


def _device_bytes():
  try:
    return int(jax.devices()[0].memory_stats()["bytes_limit"])
  except (TypeError, KeyError, AttributeError, RuntimeError):
    return None  # CPU: no device limit


def _print_remat(rows, current, device_bytes, out):
  limit = f", device memory {device_bytes / MiB:,.0f} MiB" if device_bytes else ""
  print(f"compiled step memory per device by model.remat ({jax.devices()[0].platform} compiler){limit}:", file=out)
  for policy, r in rows.items():
    total = r["per_device_total_bytes"]
    fits = "" if not device_bytes else ("  fits" if total <= device_bytes else "  does not fit")
    mark = "  <- model.remat" if policy == current else ""
    temp = r["per_device"]["step_temporaries"]
    print(f"  {policy:<34} {total / MiB:12,.1f} MiB (step temporaries {temp / MiB:,.1f}){fits}{mark}", file=out)


def remat_plan(flag: str) -> dict:
  """`--dry_run_remat[=GiB]` -> plan()'s keyword arguments: every policy, judged against GiB if given."""
  from jaxtele.errors import JaxteleError

  _, _, gib = flag.partition("=")
  try:
    device_bytes = int(float(gib) * GiB) if gib else None
  except ValueError:
    raise JaxteleError(f"--dry_run_remat: expected a memory size in GiB, got {gib!r}") from None
  return {"remat_policies": REMAT_POLICIES, "device_bytes": device_bytes}
