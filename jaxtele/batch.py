"""The batch contract between data and trainer: every batch is a dict of int32 arrays [B, T] (B rows, T seq_len).

  tokens       input ids
  targets      the next id of each input (examples are shifted before packing, so a target never crosses a
               document boundary)
  segment_ids  0 = padding, 1.. = the document a slot belongs to; attention never crosses segments
  positions    restart at 0 in each document
  loss_mask    1 where the target is trained (not padding, not a prompt token in SFT)

An example (one document before packing) holds the per-token keys `EXAMPLE_KEYS`; packing adds segments and
positions. Everything that makes, pads or describes a batch uses these names.
"""

import numpy as np

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
EXAMPLE_KEYS = ("tokens", "targets", "loss_mask")
DTYPE = np.int32


def empty(rows: int, seq_len: int) -> dict:
  """A batch with nothing in it: every slot padding (segment 0, loss_mask 0), so nothing is counted."""
  return {k: np.zeros((rows, seq_len), DTYPE) for k in KEYS}


def abstract(rows: int, seq_len: int, sharding=None) -> dict:
  """Shapes and dtypes only (jax.ShapeDtypeStruct), to lower or compile a step without data."""
  import jax  # lazily: the data pipeline uses this module without JAX

  return {k: jax.ShapeDtypeStruct((rows, seq_len), DTYPE, sharding=sharding) for k in KEYS}


def whole_rows(ids_BT1) -> dict:
  """One document per row from ids [B, T + 1]: every slot in segment 1, every target trained."""
  xp = np if isinstance(ids_BT1, np.ndarray) else _jnp()
  tokens, targets = ids_BT1[:, :-1], ids_BT1[:, 1:]
  ones = xp.ones(tokens.shape, DTYPE)
  positions = xp.broadcast_to(xp.arange(tokens.shape[1], dtype=DTYPE), tokens.shape)
  return {"tokens": tokens.astype(DTYPE), "targets": targets.astype(DTYPE), "segment_ids": ones,
          "positions": positions, "loss_mask": ones}


def _jnp():
  import jax.numpy as jnp

  return jnp
