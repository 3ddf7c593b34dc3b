"""Rotary embeddings and the attention function.

Every attention call in the project goes through `attention()`, so a fused GPU/TPU kernel can replace
the XLA reference by adding an `impl` branch; the masking semantics below are the contract.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtele.models.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Per-pair inverse frequencies [head_dim // 2], with `llama3` / `linear` scaling as HF computes them."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  rope = cfg.rope
  kind = rope.get("rope_type", "default")
  if kind == "linear":
    inv_freq = inv_freq / rope["factor"]
  elif kind == "llama3":
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x_BTNH, positions_BT, inv_freq_F):
  """Rotate-half RoPE (HF layout: the two halves of each head are the pair members)."""
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq_F
  angles_BTH = jnp.concatenate([angles_BTF, angles_BTF], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles_BTH), jnp.sin(angles_BTH)
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x_BTNH * cos + rotated * sin).astype(x_BTNH.dtype)


def attention_mask(segment_ids_BT, sliding_window=None):
  """[B, T, S] bool: causal, within one segment, never onto padding (segment 0)."""
  T = segment_ids_BT.shape[1]
  idx = jnp.arange(T)
  mask_TS = idx[:, None] >= idx[None, :]
  if sliding_window:
    mask_TS &= idx[:, None] - idx[None, :] < sliding_window
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return mask_TS[None] & same_BTS & (segment_ids_BT[:, None, :] != 0)


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, sliding_window=None, impl="xla"):
  """Grouped-query attention: N query heads share K kv heads in groups of G = N // K."""
  if impl != "xla":
    raise ValueError(f"unknown attention impl {impl!r}")
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS / np.sqrt(H).astype(np.float32)
  mask_B11TS = attention_mask(segment_ids_BT, sliding_window)[:, None, None]
  # A large finite negative (not -inf) keeps fully masked padding rows finite instead of NaN.
  scores_BKGTS = jnp.where(mask_B11TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def cached_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, sliding_window=None):
  """Attention of T new queries over a KV cache of S slots (generation).

  Causality is by position, not slot: a key is visible when its position is >= 0 (empty and padding slots
  hold -1) and not after the query's; with a sliding window, also within `sliding_window` positions. Rows
  of a left-padded batch thus see only their own tokens.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS / np.sqrt(H).astype(np.float32)
  q_BT1, k_B1S = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
  mask_BTS = (k_B1S >= 0) & (k_B1S <= q_BT1)
  if sliding_window:
    mask_BTS &= q_BT1 - k_B1S < sliding_window
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)
