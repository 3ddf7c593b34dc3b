"""Perplexity of a model on a token stream over fixed-length windows (the packed, sharded evaluation sets are
scored by `jaxtele.evaluate`)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.loss import masked_sum_and_count
from jaxtele.models.decoder import Decoder, check_token_ids


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
