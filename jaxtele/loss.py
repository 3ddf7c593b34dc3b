"""Token cross-entropy under the batch contract: summed over trained targets, divided by their count.

`masked_sum_and_count` takes materialised logits [B, T, V]. `chunked_sum_and_count` takes the final hidden
states and the output matrix instead and never holds more than one tile of logits [B, C, V]: the forward
keeps only each token's logsumexp, and the backward recomputes each tile's softmax to form dh and dW.
Tiles run along the sequence and keep the batch axis whole, so on a mesh each device scans its own rows
(scanning over a sharded axis would all-gather it: every device would compute the global head); the
partial sums (loss, dW) are kept per batch shard [S, ...] and reduced once, after the scan.
Legend: B batch, T length, S batch shards, N tiles, C positions per tile, D model dim, V vocab.
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


def _tile_logits(h_SBCD, w_DV):
  return jnp.einsum("sbcd,dv->sbcv", h_SBCD, w_DV, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll_sum(h_NSBCD, w_DV, targets_NSBC, weights_NSBC, batch_axes):
  return _nll_forward(h_NSBCD, w_DV, targets_NSBC, weights_NSBC, batch_axes)[0]


def _per_shard(x, batch_axes):
  """Pin a per-shard accumulator [S, ...] to the batch axes, so each device keeps its own partial sum and the
  scan never reduces across devices (one reduction after it)."""
  return jax.lax.with_sharding_constraint(x, P(batch_axes)) if batch_axes else x


def _nll_forward(h_NSBCD, w_DV, targets_NSBC, weights_NSBC, batch_axes):
  def tile(total_S, xs):
    h_SBCD, t_SBC, w_SBC = xs
    logits_SBCV = _tile_logits(h_SBCD, w_DV)
    lse_SBC = jax.nn.logsumexp(logits_SBCV, axis=-1)
    picked_SBC = jnp.take_along_axis(logits_SBCV, t_SBC[..., None], axis=-1)[..., 0]
    return total_S + jnp.sum((lse_SBC - picked_SBC) * w_SBC, axis=(1, 2)), lse_SBC

  S = h_NSBCD.shape[1]
  total_S, lse_NSBC = jax.lax.scan(tile, _per_shard(jnp.zeros((S,), jnp.float32), batch_axes),
                                   (h_NSBCD, targets_NSBC, weights_NSBC))
  return jnp.sum(total_S), (h_NSBCD, w_DV, targets_NSBC, weights_NSBC, lse_NSBC)


def _nll_fwd(h_NSBCD, w_DV, targets_NSBC, weights_NSBC, batch_axes):
  return _nll_forward(h_NSBCD, w_DV, targets_NSBC, weights_NSBC, batch_axes)


def _nll_bwd(batch_axes, res, g):
  h_NSBCD, w_DV, targets_NSBC, weights_NSBC, lse_NSBC = res

  def tile(dw_SDV, xs):
    h_SBCD, t_SBC, w_SBC, lse_SBC = xs
    probs_SBCV = jnp.exp(_tile_logits(h_SBCD, w_DV) - lse_SBC[..., None])
    onehot_SBCV = jax.nn.one_hot(t_SBC, w_DV.shape[1], dtype=jnp.float32)
    dlogits_SBCV = (probs_SBCV - onehot_SBCV) * (g * w_SBC)[..., None]
    dh_SBCD = jnp.einsum("sbcv,dv->sbcd", dlogits_SBCV, w_DV.astype(jnp.float32))
    dw_SDV = dw_SDV + jnp.einsum("sbcd,sbcv->sdv", h_SBCD.astype(jnp.float32), dlogits_SBCV)
    return dw_SDV, dh_SBCD.astype(h_NSBCD.dtype)

  S = h_NSBCD.shape[1]
  dw0_SDV = _per_shard(jnp.zeros((S, *w_DV.shape), jnp.float32), batch_axes)
  dw_SDV, dh_NSBCD = jax.lax.scan(tile, dw0_SDV, (h_NSBCD, targets_NSBC, weights_NSBC, lse_NSBC))
  return dh_NSBCD, jnp.sum(dw_SDV, axis=0).astype(w_DV.dtype), None, jnp.zeros_like(weights_NSBC)


_weighted_nll_sum.defvjp(_nll_fwd, _nll_bwd)


def batch_shards(B: int):
  """(S, batch axes): how many ways the context mesh (jax.set_mesh) splits the rows, and over which axes."""
  mesh = context_mesh()
  if mesh is None:
    return 1, ()
  axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  S = math.prod(mesh.shape[a] for a in axes)
  return (S, axes) if S > 1 and B % S == 0 else (1, ())


def chunked_sum_and_count(h_BTD, w_DV, targets_BT, loss_mask_BT, chunk: int = 1024):
  """Like `masked_sum_and_count(h @ w, ...)` without materialising [B, T, V]; logits are fp32 per tile.

  A tile is every row's next C positions, so the batch axis (sharded over `data`/`fsdp`) is never tiled and
  each device works on its own rows: C = max(1, chunk // rows per device), i.e. about `chunk` tokens per
  device per tile; the tail tile is padded with zero weight.
  """
  if chunk <= 0:
    raise JaxteleError(f"train.loss_chunk: must be positive, got {chunk}")
  B, T, D = h_BTD.shape
  S, batch_axes = batch_shards(B)
  C = max(1, min(T, chunk // (B // S)))
  pad = -T % C
  weights_BT = loss_mask_BT.astype(jnp.float32)
  if pad:
    h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT, weights_BT = jnp.pad(targets_BT, ((0, 0), (0, pad))), jnp.pad(weights_BT, ((0, 0), (0, pad)))
  n = (T + pad) // C
  # [B, T, ...] -> [n tiles, S shards, B/S rows, C positions, ...]
  tiles = lambda x: jnp.moveaxis(x.reshape(S, B // S, n, C, *x.shape[2:]), 2, 0)
  total = _weighted_nll_sum(tiles(h_BTD), w_DV, tiles(targets_BT), tiles(weights_BT), batch_axes)
  return total, jnp.sum(weights_BT)
