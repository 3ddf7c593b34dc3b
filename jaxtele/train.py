"""`python -m jaxtele.train --config configs/<recipe>.py [--config.key=value ...] [--dry_run]`

`setup` wires config -> mesh -> model -> data -> state; `train_loop` steps, logs, evaluates and checkpoints;
`finish` evaluates and exports. The loop never waits on the device between steps: step n's metrics are read
once step n+1 is dispatched, and the next batch is copied to the devices while the current step runs.
"""

import dataclasses
import os
import signal
import sys

import jax
import numpy as np

from jaxtele import build, distributed, progress
from jaxtele.accelerator import mesh_context, set_gpu_flags
from jaxtele.checkpoint import Checkpointer, run_meta
from jaxtele.config import check_paths, from_argv, validate
from jaxtele.data import setup as data_setup
from jaxtele.data.pipeline import packing_efficiency
from jaxtele.errors import JaxteleError, cli
from jaxtele.evaluate import evaluate
from jaxtele.metrics import TRAIN_LR, MetricsWriter, Throughput, flops_per_token, train_key
from jaxtele.models.lora import trainable_table
from jaxtele.optimizer import run_optimizer
from jaxtele.sharding import Shardings, batch_sharding, global_batch, host_copy, make_mesh, put
from jaxtele.step import init_state, make_eval_step, make_train_step
from jaxtele.token_clock import TokenClock


class PreemptionFlag:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

  def __init__(self):
    self.raised = None
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, self.handle)

  def handle(self, signum, frame):
    self.raised = signal.Signals(signum).name


@dataclasses.dataclass
class Setup:
  """Everything a run holds: built once by `setup`, used by the loop and the end of the run."""
  cfg: object
  log: object
  mesh: object
  tokenizer: object
  graphdef: object
  state: dict
  frozen: dict
  state_sh: object
  frozen_sh: object
  lr_schedule: object
  ckpt: Checkpointer
  meta: dict
  latest: int | None
  data_iter: object
  eval_sets: dict
  train_step: object
  eval_step: object
  writer: MetricsWriter
  throughput: Throughput
  clock: TokenClock  # tokens seen at a step; the steps eval.at_tokens asks for
  forget: object = None  # forgetting.Forgetting with eval.forgetting_base


def check_platform(cfg, log):
  platform, kind = jax.devices()[0].platform, jax.devices()[0].device_kind
  log(f"platform {platform} ({kind}) x{jax.device_count()}, {jax.process_count()} process(es), jax {jax.__version__}")
  want = cfg.mesh.require
  if want != "any" and platform != want:
    hint = {"gpu": ' (install the CUDA build: pip install -e ".[cuda12]" or ".[cuda13]")',
            "tpu": ' (install the TPU build: pip install -e ".[tpu]")'}.get(want, "")
    raise JaxteleError(f"mesh.require: {want}, but JAX sees {platform} devices ({kind}){hint}")


def setup(cfg) -> Setup:
  main_process = distributed.is_main()
  log = progress.log if main_process else (lambda msg: None)
  check_platform(cfg, log)
  check_paths(cfg)
  model_cfg = build.model_config(cfg.model)
  validate(cfg, model_cfg, jax.device_count(), jax.process_count())
  mesh = make_mesh(cfg.mesh)
  # build resolved `auto` and validate checked an explicit name: model_cfg.attention is what runs
  log(f"attention: {model_cfg.attention} (model.attention={cfg.model.attention}); loss: {cfg.train.loss}; "
      f"remat: {model_cfg.remat}")
  log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es)")

  tokenizer = build.load_tokenizer(cfg.model)
  doc_tok = data_setup.doc_tokenizer(cfg, tokenizer, model_cfg.vocab_size)
  ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is not None and not cfg.checkpoint.resume:
    raise JaxteleError(f"{ckpt.directory}: holds checkpoints up to step {latest}; set checkpoint.resume=True "
                       "to continue, or use another run_dir")
  saved = ckpt.read_meta(latest) if latest is not None else None
  data_seed, restore_data = data_setup.resume_stream(cfg, saved, latest, log)
  pid, pcount = jax.process_index(), jax.process_count()
  data_iter = iter(data_setup.train_data(cfg, doc_tok, pid, pcount, log, seed=data_seed))
  eval_sets = data_setup.eval_data(cfg, doc_tok, pid, pcount)

  graphdef, params, frozen = build.split_model(build.build_model(cfg), cfg)
  meta = run_meta(cfg, model_cfg, frozen, data_seed)
  tx, lr_schedule = run_optimizer(cfg)
  state = init_state(params, tx)
  rules = Shardings(mesh, model_cfg.num_heads, model_cfg.num_kv_heads)
  state_sh, frozen_sh = rules.tree(state), rules.tree(frozen)
  for line in rules.report():
    log(line)
  state, frozen = put(state, state_sh), put(frozen, frozen_sh)
  n_train = sum(x.size for x in jax.tree.leaves(params))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  log(f"{cfg.train.mode}: {n_train:,} trainable / {n_train + n_frozen:,} parameters")
  for line in trainable_table(params, frozen, model_cfg.tie_word_embeddings):
    log("  " + line)
  if latest is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state = ckpt.restore(latest, abstract, data_iter if restore_data else None, meta)
    log(f"resumed from {ckpt.directory}/{latest}")

  loss = {"loss": cfg.train.loss, "chunk": cfg.train.loss_chunk}
  dropout_seed = cfg.seed if cfg.train.mode == "lora" and cfg.lora.dropout > 0 else None
  train_step = jax.jit(make_train_step(graphdef, tx, cfg.train.grad_accum, **loss, dropout_seed=dropout_seed),
                       donate_argnums=(0,),
                       in_shardings=(state_sh, frozen_sh, batch_sharding(mesh)), out_shardings=(state_sh, None))
  adapter_params = n_train if cfg.train.mode == "lora" else 0
  throughput = Throughput(flops_per_token(model_cfg, cfg.data.seq_len, cfg.train.mode, adapter_params))
  clock = TokenClock(cfg, n_train + n_frozen, n_train)
  if clock.unreachable and cfg.eval.sets:
    log(f"warning: eval.at_tokens: {', '.join(f'{t:,}' for t in clock.unreachable)} tokens are past the run's "
        f"{cfg.train.steps * clock.tokens_per_step:,}; the final evaluation stands in for them")
  return Setup(cfg, log, mesh, tokenizer, graphdef, state, frozen, state_sh, frozen_sh, lr_schedule, ckpt, meta,
               latest, data_iter, eval_sets, train_step, jax.jit(make_eval_step(graphdef, **loss)),
               MetricsWriter(cfg.run_dir, main_process, wandb=cfg.get("metrics", {}).get("wandb"),
                             config=cfg.to_dict()), throughput, clock)


def run_evaluation(s: Setup, step: int, base: bool = False) -> dict:
  shape = (s.cfg.eval.batch_size // jax.process_count(), s.cfg.data.seq_len)
  run = lambda params, byte_count=None: evaluate(s.eval_step, params, s.frozen, s.eval_sets, s.mesh,  # noqa: E731
                                                 s.cfg.eval.max_batches, shape, byte_count)
  if base:  # the frozen base, once: every later evaluation is scored against it (forgetting.py)
    out = s.forget.evaluate_base(s, run, step)
  else:
    out = run(s.state["params"])
    out |= s.forget.metrics(step, out) if s.forget else {}
  s.writer.write(step, out, s.log, index=s.clock.index(step))
  return out


def train_loop(s: Setup) -> dict:
  cfg = s.cfg
  step = int(jax.device_get(s.state["step"]))
  end = min(cfg.train.steps, cfg.train.stop_at or cfg.train.steps)
  preempt = PreemptionFlag()
  last_saved, losses, result = s.latest, [], {}

  def settle(pending, window_ends=True):
    """Read a dispatched step's metrics (the device has moved on to the next one); stop on non-finite.
    window_ends=False: a step settled just before the next one is (an evaluation or checkpoint boundary) leaves
    its throughput window open, so the two close one window instead of one of ~0 s."""
    n, m, local = pending
    m = jax.device_get(m)
    if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
      s.ckpt.wait()
      raise JaxteleError(f"step {n}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}); "
                         f"stopped without saving. Last good checkpoint: "
                         f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in {s.ckpt.directory}")
    losses.append(float(m["loss"]))
    s.throughput.add(local["tokens"].size * jax.process_count(), int(m["trained_tokens"]), packing_efficiency(local))
    if n % cfg.train.log_every == 0 or n == end:
      metrics = {train_key(k): v for k, v in m.items()} | {TRAIN_LR: float(s.lr_schedule(n - 1))}
      if window_ends:
        metrics |= s.throughput.read()
      s.writer.write(n, metrics, index=s.clock.index(n))
      s.writer.progress(n, cfg.train.steps, metrics, first=s.latest or 0)

  if s.eval_sets and cfg.eval.get("forgetting_base"):
    from jaxtele.forgetting import Forgetting

    s.forget = Forgetting(cfg, s.log)
    if s.forget.base is None:
      result["eval_start"] = run_evaluation(s, 0, base=True)
  if s.eval_sets and cfg.eval.at_start and step == 0 and "eval_start" not in result:
    result["eval_start"] = run_evaluation(s, 0)
  pending = None
  if step < end:
    local = next(s.data_iter)
    batch = global_batch(local, s.mesh)
  while step < end:
    s.state, m = s.train_step(s.state, s.frozen, batch)
    step += 1
    periodic = cfg.eval.every and step % cfg.eval.every == 0
    evaluate_now = s.eval_sets and (periodic or step in s.clock.eval_steps) and step < end
    stop = preempt.raised  # read once: a signal arriving later in this step is handled (and saved) at the next
    save_now = step % cfg.checkpoint.every == 0 or step == end or stop
    evaluate_now = evaluate_now or (s.forget and save_now and not stop)  # each checkpoint gets a verdict
    if pending:
      settle(pending, window_ends=not (evaluate_now or save_now))
    pending = (step, m, local)
    if evaluate_now or save_now:
      settle(pending)  # never evaluate or save a step whose metrics were not checked
      pending = None
    if evaluate_now:
      result["eval"], result["eval_step"] = run_evaluation(s, step), step
      if s.forget and s.forget.over(step) and s.forget.stop:
        s.ckpt.wait()  # this step is not saved: the newest checkpoint stays the last one within budget
        return {"preempted": False, "budget_stop": True, "step": step, "losses": losses, **result}
      if s.forget:
        s.forget.protect(s.ckpt, step if save_now else None)
    if save_now:
      s.ckpt.save(step, s.state, s.data_iter, s.meta)  # before the next batch is drawn: the iterator is at `step`
      last_saved = step
    if stop:
      s.ckpt.wait()
      s.log(f"{stop}: saved step {step} to {s.ckpt.directory}; resume with the same command")
      return {"preempted": True, "step": step, "losses": losses}
    if step < end:
      local = next(s.data_iter)
      batch = global_batch(local, s.mesh)  # host -> device copy overlaps the step in flight
  if pending:
    settle(pending)
  s.ckpt.wait()
  return {"preempted": False, "step": step, "losses": losses, **result}


def finish(s: Setup, result: dict) -> dict:
  cfg, step = s.cfg, result["step"]
  if result.get("budget_stop"):
    s.log(f"stopped at step {step}: over the forgetting budget (train.on_budget=stop); the newest checkpoint is the "
          f"last within budget (python -m jaxtele.export --source {cfg.run_dir} --select best-within-budget)")
  elif step < cfg.train.steps:
    s.log(f"stopped at step {step} (train.stop_at); resume with train.stop_at=0 to finish")
  if s.eval_sets and not (s.forget and result.get("eval_step") == step):
    result["eval"] = run_evaluation(s, step)
  if s.forget and distributed.is_main():
    from jaxtele.frontier import write_summary

    result["frontier"] = write_summary(cfg.run_dir, s.forget.budget, s.log)
  exports = cfg.export.hf or cfg.export.adapter or cfg.export.merged
  if step == cfg.train.steps and not result.get("budget_stop") and exports:
    from jaxtele.export import export_run

    params_host, frozen_host = host_copy((s.state["params"], s.frozen))
    if distributed.is_main():
      export_run(cfg, s.graphdef, params_host, frozen_host, s.tokenizer, s.log)
  return result | {"state": s.state, "frozen": s.frozen}


def run(cfg) -> dict:
  distributed.initialize()
  s = setup(cfg)
  try:
    with mesh_context(s.mesh):  # the fused attention kernels take their mesh from JAX's mesh context
      result = train_loop(s)
      return result if result["preempted"] else finish(s, result)
  except jax.errors.JaxRuntimeError as e:  # a collective with a dead peer fails here: name the peer
    lost = distributed.explain_failure(e)
    if lost:  # nothing can shut down cleanly with a peer gone (checkpoint barriers would wait on it)
      print(f"error: {lost}", file=sys.stderr, flush=True)
      os._exit(distributed.EXIT_PEER_LOST)
    raise
  finally:
    s.ckpt.close()
    s.writer.close()
    distributed.finished()


@cli
def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  set_gpu_flags()  # before JAX's backend starts: XLA reads its flags once
  remat_table = next((a for a in argv if a.split("=")[0] == "--dry_run_remat"), None)  # [=GiB to fit]
  dry = "--dry_run" in argv or remat_table is not None
  cfg = from_argv([a for a in argv if a != "--dry_run" and a != remat_table])
  if dry:
    from jaxtele.plan import plan, remat_plan

    check_platform(cfg, progress.log)
    validate(cfg, build.model_config(cfg.model), jax.device_count(), jax.process_count())
    plan(cfg, **(remat_plan(remat_table) if remat_table else {}))
    return 0
  run(cfg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
