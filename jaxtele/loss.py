"""Token cross-entropy under the batch contract: summed over trained targets, divided by their count."""

import jax
import jax.numpy as jnp


def token_nll(logits_BTV, targets_BT):
  """Per-token negative log-likelihood in fp32 [B, T]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return logz_BT - picked_BT


def masked_sum_and_count(logits_BTV, targets_BT, loss_mask_BT):
  """(sum of NLL over trained targets, number of trained targets): accumulate both, divide once."""
  mask = loss_mask_BT.astype(jnp.float32)
  return jnp.sum(token_nll(logits_BTV, targets_BT) * mask), jnp.sum(mask)
