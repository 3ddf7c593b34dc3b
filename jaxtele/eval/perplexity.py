"""Perplexity: per evaluation set of packed rows (the trainer's periodic eval and `python -m jaxtele.eval`),
and of a model on a token stream over fixed-length windows."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.loss import masked_sum_and_count
from jaxtele.models.decoder import Decoder, check_token_ids
from jaxtele.sharding import global_batch

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def evaluate(eval_step, params, frozen, eval_sets, mesh, max_batches, local_shape) -> dict:
  """Perplexity per set. With several processes every process runs `max_batches` steps (validation
  requires it to be set), feeding empty batches once its shard is exhausted, so collectives line up."""
  out = {}
  for name, ds in eval_sets.items():
    total = count = 0.0
    it = iter(ds)
    for i in itertools.count():
      if max_batches and i >= max_batches:
        break
      batch = next(it, None)
      if batch is None:
        if jax.process_count() == 1:
          break
        batch = {k: np.zeros(local_shape, np.int32) for k in BATCH_KEYS}  # segment 0: nothing counted
      s, c = eval_step(params, frozen, global_batch(batch, mesh))
      total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    out.update({f"eval/{name}/loss": loss, f"eval/{name}/ppl": float(np.exp(loss)), f"eval/{name}/tokens": count})
  return out


def windows(ids, window: int, count: int | None = None) -> np.ndarray:
  """Non-overlapping [n, window + 1] slices (inputs plus the next-token target); no partial window."""
  ids = np.asarray(ids, np.int32)
  n = (len(ids) - 1) // window
  if count is not None:
    n = min(n, count)
  if n == 0:
    raise ValueError(f"need more than {window} tokens for one window, got {len(ids)}")
  return np.stack([ids[i * window: i * window + window + 1] for i in range(n)])


@nnx.jit
def _nll(model: Decoder, tokens_BT, targets_BT):
  return masked_sum_and_count(model(tokens_BT), targets_BT, jnp.ones_like(targets_BT))


def perplexity(model: Decoder, ids, window: int = 256, count: int | None = None, batch: int = 4) -> float:
  rows = check_token_ids(windows(ids, window, count), model.config.vocab_size)
  total, n = 0.0, 0.0
  for i in range(0, len(rows), batch):
    chunk = rows[i:i + batch]
    s, c = _nll(model, jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:]))
    total, n = total + float(s), n + float(c)
  return float(np.exp(total / n))
