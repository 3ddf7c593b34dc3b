"""The jitted pieces of training: a train step with gradient accumulation, and an eval step.

Pure functions over pure-dict states; `nnx.merge` rebuilds the model inside the trace. Only the
trainable leaves are differentiated. The loss is the sum over trained targets divided by their count,
taken over all micro-batches together, so accumulation equals one big batch.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtele.models import leaves
from jaxtele.models.adapters import adapter_inputs
from jaxtele.loss import chunked_sum_and_count, masked_sum_and_count, token_nll
from jaxtele.sharding import path_str


def init_state(params, tx) -> dict:
  """The train state: what a checkpoint holds besides the data position (the frozen base is not in it)."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def loss_sums(graphdef, params, frozen, batch, loss: str = "plain", chunk: int = 1024, dropout_key=None):
  """(NLL sum, trained-target count). `chunked` never materialises the [B, T, V] logits (see loss.py);
  `dropout_key` turns on adapter dropout (training); without it the model is deterministic."""
  with adapter_inputs(dropout_key=dropout_key):
    return _loss_sums(nnx.merge(graphdef, params, frozen), batch, loss, chunk)


def _loss_sums(model, batch, loss, chunk):
  if loss == "chunked":
    h_BTD = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    return chunked_sum_and_count(h_BTD, model.output_matrix(), batch["targets"], batch["loss_mask"], chunk)
  logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
  return masked_sum_and_count(logits, batch["targets"], batch["loss_mask"])


def grad_group(path: str) -> str:
  """The gradient-norm group of a trainable leaf: the group its adapter class declares for it (models/leaves.py;
  LoRA's A and B, DoRA's magnitude each their own), or "base" for trainable base weights (full FT, or extra
  modules). Logged as train/grad_norm/<group>; diagnose counts each group's parameters with it."""
  return leaves.grad_group(path)


def group_norms(grads) -> dict:
  """Gradient norm per group (`grad_group`)."""
  groups = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = grad_group(path_str(path))
    groups[name] = groups.get(name, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
  return {f"grad_norm/{k}": jnp.sqrt(v) for k, v in groups.items()}


def micro_batches(batch, k: int):
  """[B, T] -> [k, B/k, T], micro-batch i = rows i, i+k, ...: each device's rows feed every micro-batch."""
  return jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(graphdef, tx, grad_accum: int, loss: str = "plain", chunk: int = 1024,
                    dropout_seed: int | None = None):
  """`dropout_seed`: adapter dropout on, with a key per (step, micro-batch) derived from it: a resumed run
  draws the same masks as an uninterrupted one."""
  grad_fn = jax.value_and_grad(lambda p, f, b, k: loss_sums(graphdef, p, f, b, loss, chunk, k), has_aux=True)

  def train_step(state, frozen, batch):
    params = state["params"]
    step_key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state["step"])

    def accumulate(carry, i_mb):
      g_sum, s_sum, c_sum = carry
      i, mb = i_mb
      key = None if step_key is None else jax.random.fold_in(step_key, i)
      (s, c), g = grad_fn(params, frozen, mb, key)
      return (jax.tree.map(jnp.add, g_sum, g), s_sum + s, c_sum + c), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    steps = (jnp.arange(grad_accum), micro_batches(batch, grad_accum))
    (g_sum, s_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), steps)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    loss = s_sum / denom
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.tree.norm(grads)
    # A non-finite step changes nothing: the host stops the run and the last good state stays intact.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {"step": state["step"] + ok.astype(jnp.int32), "params": keep(new_params, params),
                 "opt_state": keep(opt_state, state["opt_state"])}
    metrics = {"loss": loss, "trained_tokens": count, "grad_norm": grad_norm, **group_norms(grads)}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, loss: str = "plain", chunk: int = 1024):
  def eval_step(params, frozen, batch):
    return loss_sums(graphdef, params, frozen, batch, loss, chunk)

  return eval_step


def make_token_nll_step(graphdef):
  """Per-token NLL [B, T] (0 where not scored), for per-document sums on the host; the periodic eval keeps
  the summed step above, which returns two scalars."""
  def token_nll_step(params, frozen, batch):
    with adapter_inputs():
      model = nnx.merge(graphdef, params, frozen)
      logits_BTV = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    return token_nll(logits_BTV, batch["targets"]) * batch["loss_mask"].astype(jnp.float32)

  return token_nll_step
