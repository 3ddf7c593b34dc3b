"""`python -m jaxtele.train --config configs/<recipe>.py [--config.key=value ...]`

config -> mesh -> model -> data -> loop (log, evaluate, checkpoint) -> export.
"""

import dataclasses
import json
import signal
import sys
import time

import jax
import numpy as np

from jaxtele import distributed
from jaxtele.checkpoint import Checkpointer, fingerprint
from jaxtele.config import check_paths, load_config, validate
from jaxtele.data import setup as data_setup
from jaxtele.data.pipeline import packing_efficiency
from jaxtele.errors import JaxteleError, cli
from jaxtele.eval.perplexity import evaluate
from jaxtele.metrics import MetricsWriter, flops_per_token, peak_flops
from jaxtele import build
from jaxtele.optimizer import make_optimizer
from jaxtele.sharding import batch_sharding, global_batch, make_mesh, tree_shardings
from jaxtele.step import init_state, make_eval_step, make_train_step


def put(tree, shardings):
  """Host arrays (identical on every process) -> global arrays with the given shardings."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                      tree, shardings)


def host_copy(tree):
  """Full numpy copies of (possibly multi-process) global arrays."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def run_meta(cfg, model_cfg, frozen, data_seed: int) -> dict:
  """What identifies a run's checkpoints; a restore must match it."""
  lora = {k: cfg.lora[k] for k in ("rank", "alpha", "targets", "rslora", "extra_trainable")} \
      if cfg.train.mode == "lora" else None
  model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("remat", "dtype")}
  meta = {"model": model, "mode": cfg.train.mode, "lora": lora,
          "base_fingerprint": fingerprint(frozen) if cfg.train.mode == "lora" else None,
          "base_source": cfg.model.source, "process_count": jax.process_count(), "data_seed": data_seed,
          "config": cfg.to_dict()}
  return json.loads(json.dumps(meta, default=str))  # compare as it will read back from JSON


def data_resume(cfg, saved: dict | None, step: int | None, log) -> tuple[int, bool]:
  """(the training stream's seed, whether to restore its iterator state from the checkpoint).

  Grain keeps one iterator state per process, so the data position carries over only to the same
  process count. On another count the model and optimizer still resume exactly, and the stream
  restarts in a new order (seed + step) rather than replaying the epoch from its first batch.
  """
  if saved is None:
    return cfg.data.seed, False
  seed = saved.get("data_seed", cfg.data.seed)
  if saved.get("process_count", jax.process_count()) == jax.process_count():
    return seed, True
  log(f"warning: step {step} was saved by {saved['process_count']} process(es) and this run has "
      f"{jax.process_count()}: parameters and optimizer state resume exactly; the data stream restarts in a new "
      f"order (seed {seed + step}), so documents already seen this epoch may come again")
  return seed + step, False


class PreemptionFlag:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

  def __init__(self):
    self.raised = None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self.handle)

  def handle(self, signum, frame):
    self.raised = signal.Signals(signum).name


class Throughput:
  """Since the last read: trained tokens/s, MFU where the device's peak FLOPs are known, and the
  packing efficiency (real tokens / slots) of this process's batches."""

  def __init__(self, flops_per_token: float):
    self.flops_per_token, self.peak = flops_per_token, peak_flops()
    self.tokens, self.efficiency, self.steps, self.tic = 0, 0.0, 0, time.time()

  def add(self, tokens: int, efficiency: float):
    self.tokens, self.efficiency, self.steps = self.tokens + tokens, self.efficiency + efficiency, self.steps + 1

  def read(self) -> dict:
    tps = self.tokens / max(time.time() - self.tic, 1e-9)
    mfu = tps * self.flops_per_token / (self.peak * jax.device_count()) if self.peak else None
    out = {"train/tokens_per_s": tps, "train/mfu": mfu, "train/packing_efficiency": self.efficiency / self.steps}
    self.tokens, self.efficiency, self.steps, self.tic = 0, 0.0, 0, time.time()
    return out


def run(cfg) -> dict:
  distributed.initialize()
  check_paths(cfg)
  model_cfg = build.model_config(cfg.model)
  validate(cfg, model_cfg, jax.device_count(), jax.process_count())
  main_process = distributed.is_main()
  log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if main_process else (lambda msg: None)
  mesh = make_mesh(cfg.mesh)
  log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es)")

  tokenizer = build.load_tokenizer(cfg.model)
  doc_tok = data_setup.doc_tokenizer(cfg, tokenizer, model_cfg.vocab_size)
  ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is not None and not cfg.checkpoint.resume:
    raise JaxteleError(f"{ckpt.directory}: holds checkpoints up to step {latest}; set checkpoint.resume=True "
                       "to continue, or use another run_dir")
  data_seed, restore_data = data_resume(cfg, ckpt.read_meta(latest) if latest is not None else None, latest, log)
  pid, pcount = jax.process_index(), jax.process_count()
  data_iter = iter(data_setup.train_data(cfg, doc_tok, pid, pcount, log, seed=data_seed))
  eval_sets = data_setup.eval_data(cfg, doc_tok, pid, pcount)

  model = build.build_model(cfg)
  graphdef, params, frozen = build.split_model(model, cfg)
  del model
  meta = run_meta(cfg, model_cfg, frozen, data_seed)
  tx, lr_schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
  state = init_state(params, tx)
  state_sh, frozen_sh = tree_shardings(state, mesh), tree_shardings(frozen, mesh)
  state, frozen = put(state, state_sh), put(frozen, frozen_sh)
  n_train = sum(x.size for x in jax.tree.leaves(params))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  log(f"{cfg.train.mode}: {n_train:,} trainable / {n_train + n_frozen:,} parameters")

  if latest is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state = ckpt.restore(latest, abstract, data_iter if restore_data else None, meta)
    log(f"resumed from {ckpt.directory}/{latest}")

  train_step = jax.jit(make_train_step(graphdef, tx, cfg.train.grad_accum), donate_argnums=(0,),
                       in_shardings=(state_sh, frozen_sh, batch_sharding(mesh)), out_shardings=(state_sh, None))
  eval_step = jax.jit(make_eval_step(graphdef))
  writer = MetricsWriter(cfg.run_dir, main_process)
  throughput = Throughput(flops_per_token(model_cfg, cfg.data.seq_len, cfg.train.mode))
  preempt = PreemptionFlag()
  eval_shape = (cfg.eval.batch_size // jax.process_count(), cfg.data.seq_len)
  step = int(jax.device_get(state["step"]))
  end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
  last_saved, losses, result = latest, [], {}
  try:
    if eval_sets and cfg.eval.at_start and step == 0:
      result["eval_start"] = evaluate(eval_step, state["params"], frozen, eval_sets, mesh, cfg.eval.max_batches, eval_shape)
      writer.write(0, result["eval_start"], log)
    while step < end:
      local = next(data_iter)
      state, m = train_step(state, frozen, global_batch(local, mesh))
      # A few scalars per step: the sync lets a NaN stop the run before anything is checkpointed; the
      # next batch is already prefetched by Grain, so the device waits only for the host-to-device copy.
      m = jax.device_get(m)
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
        ckpt.wait()
        raise JaxteleError(f"step {step + 1}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}); "
                           f"stopped without saving. Last good checkpoint: "
                           f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in {ckpt.directory}")
      step += 1
      losses.append(float(m["loss"]))
      throughput.add(int(m["trained_tokens"]), packing_efficiency(local))
      if step % cfg.train.log_every == 0 or step == end:
        metrics = {f"train/{k}": v for k, v in m.items()} | {"train/lr": float(lr_schedule(step - 1))}
        metrics |= throughput.read()
        writer.write(step, metrics)
        writer.progress(step, cfg.train.steps, metrics)
      if eval_sets and cfg.eval.every and step % cfg.eval.every == 0 and step < end:
        writer.write(step, evaluate(eval_step, state["params"], frozen, eval_sets, mesh, cfg.eval.max_batches, eval_shape), log)
      if step % cfg.checkpoint.every == 0 or step == end or preempt.raised:
        ckpt.save(step, state, data_iter, meta)
        last_saved = step
      if preempt.raised:
        ckpt.wait()
        log(f"{preempt.raised}: saved step {step} to {ckpt.directory}; resume with the same command")
        return {"preempted": True, "step": step, "losses": losses}
    ckpt.wait()
    if step < cfg.train.steps:
      log(f"stopped at step {step} (train.stop_at); resume with train.stop_at=0 to finish")
    if eval_sets:
      result["eval"] = evaluate(eval_step, state["params"], frozen, eval_sets, mesh, cfg.eval.max_batches, eval_shape)
      writer.write(step, result["eval"], log)
    if step == cfg.train.steps and (cfg.export.hf or cfg.export.adapter or cfg.export.merged):
      from jaxtele.export import export_run

      params_host, frozen_host = host_copy((state["params"], frozen))  # a collective: every process calls it
      if main_process:
        export_run(cfg, graphdef, params_host, frozen_host, tokenizer, log)
  finally:
    ckpt.close()
    writer.close()
  return {"preempted": False, "step": step, "losses": losses, "state": state, "frozen": frozen, **result}


@cli
def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  config_path, overrides = None, []
  for i, a in enumerate(argv):
    if a == "--config" and i + 1 < len(argv):
      config_path = argv[i + 1]
    elif a.startswith("--config="):
      config_path = a.split("=", 1)[1]
    elif a.startswith("--config."):
      overrides.append(a)
    elif i == 0 or argv[i - 1] != "--config":
      raise JaxteleError(f"unknown argument {a!r} (usage: --config FILE [--config.key=value ...])")
  if not config_path:
    raise JaxteleError("--config: required (e.g. --config configs/quickstart.py)")
  cfg = load_config(config_path, overrides)
  result = run(cfg)
  return 0 if result else 1


if __name__ == "__main__":
  sys.exit(main())
