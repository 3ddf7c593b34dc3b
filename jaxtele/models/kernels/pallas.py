"""Pallas flash attention under the batch contract, using the kernels JAX ships.

Two kernels, both taking segment ids directly (so packed rows never attend across documents):
- `triton`: `jax.experimental.pallas.ops.gpu.attention.mha` (GPU). It wants as many kv heads as query
  heads, so GQA repeats k/v (autodiff sums the repeated gradients back); it has no sliding window.
- `splash`: `jax.experimental.pallas.ops.tpu.splash_attention` (TPU), with GQA and `LocalMask` windows.
On CPU either runs with `interpret=True`, which is how the tests check them.

Rows are padded to the kernels' block multiple with segment id 0: real queries never see those keys, and
outputs at padding positions (segment 0) are unspecified but finite, as in every implementation.
Shape letters: jaxtele/models/__init__.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

def padded_length(T: int, block: int = 128) -> int:
  """The row length the kernels run at: a power of two (>= 16) up to `block`, else a multiple of `block`."""
  if T <= block:
    return max(16, 1 << (T - 1).bit_length())
  return -(-T // block) * block


def _pad_rows(x_BT, T_pad):
  pad = [(0, 0), (0, T_pad - x_BT.shape[1])] + [(0, 0)] * (x_BT.ndim - 2)
  return jnp.pad(x_BT, pad)


def triton_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, interpret=False):
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  B, T, N, H = q_BTNH.shape
  G = N // k_BSKH.shape[2]
  T_pad = padded_length(T)
  seg_BT = _pad_rows(segment_ids_BT.astype(jnp.int32), T_pad)
  q_BTNH = _pad_rows(q_BTNH, T_pad)
  k_BSNH = _pad_rows(jnp.repeat(k_BSKH, G, axis=2), T_pad)
  v_BSNH = _pad_rows(jnp.repeat(v_BSKH, G, axis=2), T_pad)
  block = min(128, T_pad)
  sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(32, block),
                                   block_kv_dkv=min(32, block), block_q_dq=min(32, block),
                                   block_kv_dq=min(32, block))
  out_BTNH = gpu_attention.mha(q_BTNH, k_BSNH, v_BSNH, seg_BT, sm_scale=float(1 / np.sqrt(H)), causal=True,
                               block_sizes=sizes, interpret=interpret)
  return out_BTNH[:, :T]


@functools.lru_cache(maxsize=32)
def _splash_kernel(T_pad: int, N: int, sliding_window, interpret: bool):
  """Built once per shape: the mask is preprocessed on the host into block-sparsity tables."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  if sliding_window:
    head_mask = splash.LocalMask((T_pad, T_pad), window_size=(sliding_window - 1, 0), offset=0)
  else:
    head_mask = splash.CausalMask((T_pad, T_pad))
  block = min(128, T_pad)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():  # concrete tables, so the cached kernel holds no tracer
    return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * N), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, sliding_window=None, interpret=False):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  B, T, N, H = q_BTNH.shape
  T_pad = padded_length(T, 128) if T > 128 else 128  # TPU tiles are 128 long
  kernel = _splash_kernel(T_pad, N, sliding_window, interpret)
  # Splash does not scale the logits; fold 1/sqrt(H) into q (in fp32, then back to the input dtype).
  q_BNTH = (_pad_rows(q_BTNH, T_pad).astype(jnp.float32) / np.sqrt(H)).astype(q_BTNH.dtype).transpose(0, 2, 1, 3)
  k_BKSH = _pad_rows(k_BSKH, T_pad).transpose(0, 2, 1, 3)
  v_BKSH = _pad_rows(v_BSKH, T_pad).transpose(0, 2, 1, 3)
  seg_BT = _pad_rows(segment_ids_BT.astype(jnp.int32), T_pad)
  one_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
  out_BNTH = jax.vmap(one_row)(q_BNTH, k_BKSH, v_BKSH, seg_BT)
  return out_BNTH.transpose(0, 2, 1, 3)[:, :T].astype(q_BTNH.dtype)


def pallas_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, sliding_window=None, kernel="triton",
                     interpret=False):
  if kernel == "splash":
    return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, sliding_window=sliding_window,
                            interpret=interpret)
  if sliding_window:
    raise ValueError("the Triton kernel has no sliding window")  # resolve_attention refuses first
  return triton_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, interpret=interpret)
