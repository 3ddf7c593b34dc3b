"""Rotary embeddings and the attention function.

Every attention call in the project goes through `attention()`, which dispatches to an implementation:
`xla` (the reference below, fp32 scores [B, K, G, T, S]), `cudnn` (cuDNN flash attention), `pallas`
(Triton flash attention on GPU, splash on TPU, either interpreted on CPU). A config's `auto` (the fastest one
that honours the contract on this backend; `resolve_attention` says which) is decided once, when a Decoder is
built, never in a trace. The contract: causal, within one
segment, never onto padding (segment 0); outputs at padding positions are unspecified but finite.
Soft-capping (Gemma 2: scores -> tanh(scores / cap) * cap before masking) only `xla` implements; the fused
kernels refuse it, and `auto` picks `xla` for it. Under a mesh context (`jax.set_mesh`) the fused kernels run
per device under `shard_map` (kernels/sharded.py).
Shape letters: jaxtele/models/__init__.py.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtele.errors import JaxteleError
from jaxtele.models.config import ModelConfig
from jaxtele.models.kernels import cudnn, pallas
from jaxtele.models.kernels.sharded import sharded

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")



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


def apply_rope(x_BTNH, positions_BT, inv_freq_E):
  """Rotate-half RoPE (HF layout: the two halves of each head are the pair members)."""
  angles_BTE = positions_BT[..., None].astype(jnp.float32) * inv_freq_E
  angles_BTH = jnp.concatenate([angles_BTE, angles_BTE], axis=-1)[:, :, None, :]
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


def resolve_attention(impl: str, dtype, head_dim: int, sliding_window=None, backend: str | None = None,
                      softcap=None) -> str:
  """The implementation that runs for `impl` on this backend ("xla", "cudnn" or "pallas"), for logs.

  Explicit requests the backend cannot honour are refused in one line rather than silently replaced; the
  message names no config key (the build layer adds it).
  """
  if impl not in ATTENTION_IMPLS:
    raise JaxteleError(f"unknown attention implementation {impl!r} (choose from {', '.join(ATTENTION_IMPLS)})")
  backend = backend or jax.default_backend()
  cudnn_ok = jnp.dtype(dtype).name in cudnn.DTYPES and head_dim % 8 == 0 and head_dim <= (cudnn.max_head_dim() if backend == "gpu" else 128)
  if softcap and impl in ("cudnn", "pallas"):
    raise JaxteleError(f"{impl}: the kernel has no attention-logit soft-capping "
                       f"(softcap={softcap}); use xla or auto")
  if impl == "auto":  # the README's table "Which attention `auto` runs"
    if softcap:
      return "xla"
    if backend == "gpu":
      # Never Triton: its fp32 [128, head_dim] blocks overflow shared memory at head dim 128, and every bf16/fp16
      # head dim it compiles for (powers of two, 16..128) cuDNN takes too.
      return "cudnn" if cudnn_ok else "xla"
    return "pallas" if backend == "tpu" else "xla"
  if impl == "cudnn":
    if backend != "gpu":
      raise JaxteleError(f"cudnn needs a CUDA GPU, but the JAX backend is {backend!r}")
    if not cudnn_ok:
      raise JaxteleError(f"cudnn needs bf16/fp16 and a head dim multiple of 8 up to "
                         f"{cudnn.max_head_dim()}; got {jnp.dtype(dtype).name}, head_dim={head_dim}")
  if impl == "pallas" and backend == "gpu" and sliding_window:
    raise JaxteleError("pallas: the GPU Pallas kernel has no sliding window; use cudnn or xla")
  return impl


def pallas_kernel(backend: str, sliding_window=None) -> str:
  """GPU runs the Triton kernel, TPU splash; CPU interprets Triton, or splash when a window is needed."""
  if backend == "tpu" or (backend != "gpu" and sliding_window):
    return "splash"
  return "triton"


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, sliding_window=None, impl="xla", softcap=None):
  """Grouped-query attention: N query heads share K kv heads in groups of G = N // K."""
  if impl == "auto":  # a Decoder decides `auto` once, at construction (decoder.settled); a trace never does
    raise JaxteleError("attention: impl='auto' reached a trace; pass xla, cudnn or pallas (decoder.settled decides)")
  backend = jax.default_backend()
  resolve_attention(impl, q_BTNH.dtype, q_BTNH.shape[-1], sliding_window, backend, softcap)  # refuses what cannot run
  if impl == "cudnn":
    # Per shard, like Pallas: cuDNN's own partitioning rules are not relied on for heads that do not split.
    kernel = functools.partial(cudnn.cudnn_attention, sliding_window=sliding_window)
    return sharded(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  if impl == "pallas":
    kernel = functools.partial(pallas.pallas_attention, sliding_window=sliding_window,
                               kernel=pallas_kernel(backend, sliding_window), interpret=backend not in ("gpu", "tpu"))
    return sharded(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, sliding_window=sliding_window, softcap=softcap)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, sliding_window=None, softcap=None):
  """The reference: dense fp32 scores with the contract's mask."""
  return dense_attention(q_BTNH, k_BSKH, v_BSKH, attention_mask(segment_ids_BT, sliding_window), softcap)


def cached_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, *, sliding_window=None, softcap=None):
  """Attention of T new queries over a KV cache of S slots (generation).

  Causality is by position, not slot: a key is visible when its position is >= 0 (empty and padding slots
  hold -1) and not after the query's; with a sliding window, also within `sliding_window` positions. Rows
  of a left-padded batch thus see only their own tokens.
  """
  q_BT1, k_B1S = q_pos_BT[:, :, None], k_pos_BS[:, None, :]
  mask_BTS = (k_B1S >= 0) & (k_B1S <= q_BT1)
  if sliding_window:
    mask_BTS &= q_BT1 - k_B1S < sliding_window
  return dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, softcap)


def dense_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, softcap=None):
  """Grouped-query attention with fp32 scores under a [B, T, S] bool mask: N query heads share K kv heads."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  scores_BKGTS = scores_BKGTS / np.sqrt(H).astype(np.float32)
  if softcap:
    scores_BKGTS = jnp.tanh(scores_BKGTS / np.float32(softcap)) * np.float32(softcap)
  # A large finite negative (not -inf) keeps fully masked padding rows finite instead of NaN.
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)
