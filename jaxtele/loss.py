"""Token cross-entropy under the batch contract: summed over trained targets, divided by their count.

`masked_sum_and_count` takes materialised logits [B, T, V]. `chunked_sum_and_count` takes the final hidden
states and the output matrix instead and never holds more than one tile of logits [C, V]: the forward
keeps only each token's logsumexp, and the backward recomputes each tile's softmax to form dh and dW.
Legend: B batch, T length, M = B*T tokens, C tokens per chunk, D model dim, V vocab.
"""

import functools

import jax
import jax.numpy as jnp

from jaxtele.errors import JaxteleError

LOSSES = ("plain", "chunked")


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


def _tile_logits(h_CD, w_DV):
  return jnp.einsum("cd,dv->cv", h_CD, w_DV, preferred_element_type=jnp.float32)


def _chunks(x_M, chunk):
  return x_M.reshape(-1, chunk, *x_M.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(h_MD, w_DV, targets_M, weights_M, chunk):
  return _nll_forward(h_MD, w_DV, targets_M, weights_M, chunk)[0]


def _nll_forward(h_MD, w_DV, targets_M, weights_M, chunk):
  def tile(total, xs):
    h_CD, t_C, w_C = xs
    logits_CV = _tile_logits(h_CD, w_DV)
    lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
    picked_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
    return total + jnp.sum((lse_C - picked_C) * w_C), lse_C

  total, lse_NC = jax.lax.scan(tile, jnp.zeros((), jnp.float32),
                               (_chunks(h_MD, chunk), _chunks(targets_M, chunk), _chunks(weights_M, chunk)))
  return total, (h_MD, w_DV, targets_M, weights_M, lse_NC.reshape(-1))


def _nll_fwd(h_MD, w_DV, targets_M, weights_M, chunk):
  return _nll_forward(h_MD, w_DV, targets_M, weights_M, chunk)


def _nll_bwd(chunk, res, g):
  h_MD, w_DV, targets_M, weights_M, lse_M = res

  def tile(dw_DV, xs):
    h_CD, t_C, w_C, lse_C = xs
    probs_CV = jnp.exp(_tile_logits(h_CD, w_DV) - lse_C[:, None])
    onehot_CV = jax.nn.one_hot(t_C, w_DV.shape[1], dtype=jnp.float32)
    dlogits_CV = (probs_CV - onehot_CV) * (g * w_C)[:, None]
    dh_CD = jnp.einsum("cv,dv->cd", dlogits_CV, w_DV.astype(jnp.float32))
    dw_DV = dw_DV + jnp.einsum("cd,cv->dv", h_CD.astype(jnp.float32), dlogits_CV)
    return dw_DV, dh_CD.astype(h_MD.dtype)

  xs = (_chunks(h_MD, chunk), _chunks(targets_M, chunk), _chunks(weights_M, chunk), _chunks(lse_M, chunk))
  dw_DV, dh_NCD = jax.lax.scan(tile, jnp.zeros(w_DV.shape, jnp.float32), xs)
  return dh_NCD.reshape(h_MD.shape), dw_DV.astype(w_DV.dtype), None, jnp.zeros_like(weights_M)


_weighted_nll_sum.defvjp(_nll_fwd, _nll_bwd)


def chunked_sum_and_count(h_BTD, w_DV, targets_BT, loss_mask_BT, chunk: int = 1024):
  """Like `masked_sum_and_count(h @ w, ...)` without materialising [B, T, V]; logits are fp32 per tile.

  `chunk` tokens per tile (rounded down to the token count); the tail tile is padded with zero weight.
  """
  if chunk <= 0:
    raise JaxteleError(f"train.loss_chunk: must be positive, got {chunk}")
  D = h_BTD.shape[-1]
  h_MD, targets_M = h_BTD.reshape(-1, D), targets_BT.reshape(-1)
  weights_M = loss_mask_BT.reshape(-1).astype(jnp.float32)
  M = h_MD.shape[0]
  chunk = min(chunk, M)
  pad = -M % chunk
  if pad:
    h_MD = jnp.pad(h_MD, ((0, pad), (0, 0)))
    targets_M, weights_M = jnp.pad(targets_M, (0, pad)), jnp.pad(weights_M, (0, pad))
  return _weighted_nll_sum(h_MD, w_DV, targets_M, weights_M, chunk), jnp.sum(weights_M)
