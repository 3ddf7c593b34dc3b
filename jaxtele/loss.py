"""Token cross-entropy under the batch contract: summed over trained targets, divided by their count.

`masked_sum_and_count` takes materialised logits [B, T, V]. `chunked_sum_and_count` takes the final hidden
states and the output matrix instead and never holds more than one tile of logits [B, C, V]: the forward
keeps only each token's logsumexp, and the backward recomputes each tile's softmax to form dh and dW.
Tiles run along the sequence and keep the batch axis whole, so on a mesh each device scans its own rows
(scanning over a sharded axis would all-gather it: every device would compute the global head); the
partial sums (loss, dW) are kept per batch shard [X, ...] and reduced once, after the scan.
Shape letters: jaxtele/models/__init__.py (here X batch shards, W tiles, C positions per tile).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtele.errors import JaxteleError
from jaxtele.models.kernels.sharded import BATCH_AXES, context_mesh

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


def _tile_logits(h_XBCD, w_DV):
  return jnp.einsum("xbcd,dv->xbcv", h_XBCD, w_DV, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(h_WXBCD, w_DV, targets_WXBC, weights_WXBC, batch_axes):
  return _nll_forward(h_WXBCD, w_DV, targets_WXBC, weights_WXBC, batch_axes)[0]


def _per_shard(x, batch_axes):
  """Pin a per-shard accumulator [X, ...] to the batch axes, so each device keeps its own partial sum and the
  scan never reduces across devices (one reduction after it)."""
  return jax.lax.with_sharding_constraint(x, P(batch_axes)) if batch_axes else x


def _nll_forward(h_WXBCD, w_DV, targets_WXBC, weights_WXBC, batch_axes):
  def tile(total_X, xs):
    h_XBCD, t_XBC, w_XBC = xs
    logits_XBCV = _tile_logits(h_XBCD, w_DV)
    lse_XBC = jax.nn.logsumexp(logits_XBCV, axis=-1)
    picked_XBC = jnp.take_along_axis(logits_XBCV, t_XBC[..., None], axis=-1)[..., 0]
    return total_X + jnp.sum((lse_XBC - picked_XBC) * w_XBC, axis=(1, 2)), lse_XBC

  X = h_WXBCD.shape[1]
  total_X, lse_WXBC = jax.lax.scan(tile, _per_shard(jnp.zeros((X,), jnp.float32), batch_axes),
                                   (h_WXBCD, targets_WXBC, weights_WXBC))
  return jnp.sum(total_X), (h_WXBCD, w_DV, targets_WXBC, weights_WXBC, lse_WXBC)


def _nll_fwd(h_WXBCD, w_DV, targets_WXBC, weights_WXBC, batch_axes):
  return _nll_forward(h_WXBCD, w_DV, targets_WXBC, weights_WXBC, batch_axes)


def _nll_bwd(batch_axes, res, g):
  h_WXBCD, w_DV, targets_WXBC, weights_WXBC, lse_WXBC = res

  def tile(dw_XDV, xs):
    h_XBCD, t_XBC, w_XBC, lse_XBC = xs
    probs_XBCV = jnp.exp(_tile_logits(h_XBCD, w_DV) - lse_XBC[..., None])
    onehot_XBCV = jax.nn.one_hot(t_XBC, w_DV.shape[1], dtype=jnp.float32)
    dlogits_XBCV = (probs_XBCV - onehot_XBCV) * (g * w_XBC)[..., None]
    dh_XBCD = jnp.einsum("xbcv,dv->xbcd", dlogits_XBCV, w_DV.astype(jnp.float32))
    dw_XDV = dw_XDV + jnp.einsum("xbcd,xbcv->xdv", h_XBCD.astype(jnp.float32), dlogits_XBCV)
    return dw_XDV, dh_XBCD.astype(h_WXBCD.dtype)

  X = h_WXBCD.shape[1]
  dw0_XDV = _per_shard(jnp.zeros((X, *w_DV.shape), jnp.float32), batch_axes)
  dw_XDV, dh_WXBCD = jax.lax.scan(tile, dw0_XDV, (h_WXBCD, targets_WXBC, weights_WXBC, lse_WXBC))
  return dh_WXBCD, jnp.sum(dw_XDV, axis=0).astype(w_DV.dtype), None, jnp.zeros_like(weights_WXBC)


_weighted_nll_sum.defvjp(_nll_fwd, _nll_bwd)


def batch_shards(B: int):
  """(X, batch axes): how many ways the context mesh (jax.set_mesh) splits the rows, and over which axes."""
  mesh = context_mesh()
  if mesh is None:
    return 1, ()
  axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  X = math.prod(mesh.shape[a] for a in axes)
  return (X, axes) if X > 1 and B % X == 0 else (1, ())


def chunked_sum_and_count(h_BTD, w_DV, targets_BT, loss_mask_BT, chunk: int = 1024):
  """Like `masked_sum_and_count(h @ w, ...)` without materialising [B, T, V]; logits are fp32 per tile.

  A tile is every row's next C positions, so the batch axis (sharded over `data`/`fsdp`) is never tiled and
  each device works on its own rows: C = max(1, chunk // rows per device), i.e. about `chunk` tokens per
  device per tile; the tail tile is padded with zero weight.
  """
  if chunk <= 0:
    raise JaxteleError(f"chunked loss: the chunk must be positive, got {chunk}")  # config: train.loss_chunk
  B, T, D = h_BTD.shape
  X, batch_axes = batch_shards(B)
  C = max(1, min(T, chunk // (B // X)))
  pad = -T % C
  weights_BT = loss_mask_BT.astype(jnp.float32)
  if pad:
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT, weights_BT = jnp.pad(targets_BT, ((0, 0), (0, pad))), jnp.pad(weights_BT, ((0, 0), (0, pad)))
  n = (T + pad) // C
  # [B, T, ...] -> [n tiles, X shards, B/X rows, C positions, ...]
  tiles = lambda x: jnp.moveaxis(x.reshape(X, B // X, n, C, *x.shape[2:]), 2, 0)
  total = _weighted_nll_sum(tiles(h_BTD), w_DV, tiles(targets_BT), tiles(weights_BT), batch_axes)
  return total, jnp.sum(weights_BT)
