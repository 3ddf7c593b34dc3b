"""What a run will hold, before it holds it (`python -m jaxtele.train ... --dry_run`): the resolved config,
the mesh, parameter counts, optimizer-state bytes and memory per device, from shapes alone.

Per device = parameters + frozen base + optimizer state + gradients (as sharded by the rules) + the train
step's temporaries from XLA's compiled memory analysis on this backend (activations, logits, workspace).
Compiled on the CPU the temporaries are an estimate of what a GPU/TPU build needs, not a measurement of it.
"""

import sys

import jax

from jaxtele import build
from jaxtele.config import print_config
from jaxtele.optimizer import run_optimizer
from jaxtele.sharding import Shardings, batch_sharding, bytes_per_device, make_mesh
from jaxtele.step import init_state, make_train_step

MiB = 2**20


def plan(cfg, compile_step: bool = True, out=None) -> dict:
  out = out or sys.stdout
  model_cfg = build.model_config(cfg.model)
  mesh = make_mesh(cfg.mesh)
  graphdef, params, frozen = build.abstract_split(cfg)
  tx, _ = run_optimizer(cfg)
  state = jax.eval_shape(lambda p: init_state(p, tx), params)
  rules = Shardings(mesh, model_cfg.num_heads, model_cfg.num_kv_heads)
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
    batch = {k: jax.ShapeDtypeStruct((B, T), jax.numpy.int32, sharding=batch_sharding(mesh))
             for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    abstract = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    step = jax.jit(make_train_step(graphdef, tx, cfg.train.grad_accum, cfg.train.loss, cfg.train.loss_chunk),
                   donate_argnums=(0,))
    compiled = step.lower(abstract(state, state_sh), abstract(frozen, frozen_sh), batch).compile()
    report["per_device"]["step_temporaries"] = int(compiled.memory_analysis().temp_size_in_bytes)
  report["per_device_total_bytes"] = sum(report["per_device"].values())

  print("config:", file=out)
  print_config(cfg, file=out)
  print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s) "
        f"({jax.devices()[0].device_kind}), {jax.process_count()} process(es)", file=out)
  for line in rules.report():
    print(line, file=out)
  print(f"parameters: {report['trainable_params']:,} trainable / {report['total_params']:,} total "
        f"({cfg.train.mode})", file=out)
  print(f"optimizer state: {report['optimizer_state_bytes'] / MiB:,.1f} MiB", file=out)
  parts = ", ".join(f"{k} {v / MiB:,.1f}" for k, v in report["per_device"].items())
  print(f"memory per device: {report['per_device_total_bytes'] / MiB:,.1f} MiB ({parts} MiB)", file=out)
  return report
