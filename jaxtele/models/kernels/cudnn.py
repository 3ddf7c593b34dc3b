"""cuDNN flash attention (GPU, bf16/fp16) under the batch contract.

`jax.nn.dot_product_attention` exposes per-row lengths (`query_seq_lengths`), not packed documents, so
the segment rule goes in as a boolean `mask` [B, 1, T, S] (broadcast over heads) next to `is_causal`;
JAX turns it into an additive bias for the fused kernel. GQA is native (K kv heads); the sliding window
is `local_window_size=(window - 1, 0)`, which the cuDNN branch maps to its left window of `window` keys.
`implementation` is a parameter so the tests can run the very same call through JAX's XLA path on CPU.

Faster follow-up (Hopper+): cuDNN's packed THD layout (`q_offsets`/`kv_offsets` in
`jax._src.cudnn.fused_attention_stablehlo`) skips the bias read and its gradient, but needs a static bound
on documents per row from the data pipeline.
Shape letters: jaxtele/models/__init__.py.
"""

import functools

import jax

DTYPES = ("bfloat16", "float16")


def segment_mask(segment_ids_BT):
  """[B, 1, T, S] bool: same document and not padding (the causal and window parts are the kernel's)."""
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (same_BTS & (segment_ids_BT[:, None, :] != 0))[:, None]


@functools.lru_cache(maxsize=1)
def max_head_dim() -> int:
  """cuDNN flash attention takes head dims up to 128, or 256 on Hopper and later (multiples of 8).
  Cached: `build` asks first, so the model's trace never queries devices."""
  try:
    major = int(str(jax.devices("gpu")[0].compute_capability).split(".")[0])
  except (RuntimeError, IndexError, AttributeError, ValueError):
    return 128
  return 256 if major >= 9 else 128


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, sliding_window=None, implementation="cudnn"):
  window = (sliding_window - 1, 0) if sliding_window else None
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=segment_mask(segment_ids_BT), is_causal=True,
                                      local_window_size=window, implementation=implementation)
