"""NF4 (4-bit NormalFloat, QLoRA, Dettmers et al. 2023) storage for a frozen kernel, dequantized on the fly.

A kernel [I, O] is cut into blocks of 64 consecutive input rows per output column (rows padded with zeros
to a multiple of 64); each block stores its absmax and a 4-bit index into the NF4 code book per weight, two
per byte. With double quantization the fp32 absmaxes are themselves stored as int8 in blocks of 256
(minus their mean, one fp32 scale per block): 0.5 + 4/64 = 0.5625 bytes per weight becomes ~0.516.
Shape letters: jaxtele/models/__init__.py.
"""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.models import leaves

BLOCK = 64
SCALE_BLOCK = 256


def nf4_code_book() -> np.ndarray:
  """The 16 NF4 values, built as the QLoRA paper builds them: normal quantiles of 8 positive and 7 negative
  evenly spaced probabilities ending at offset 0.9677 = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, plus an exact
  zero, normalised to [-1, 1]."""
  offset = 0.9677083
  q = statistics.NormalDist().inv_cdf
  pos = [q(offset + (0.5 - offset) * i / 8) for i in range(8)]
  neg = [-q(offset + (0.5 - offset) * i / 7) for i in range(7)]
  values = np.sort(np.asarray(pos + neg + [0.0], np.float64))
  return (values / values.max()).astype(np.float32)


CODE_BOOK = nf4_code_book()


class Quantized(nnx.Variable):
  """A quantized base's storage: frozen, never cast to another dtype, never differentiated."""


def quantize_codes(w_IO):
  """-> (codes uint8 [J/2, O], absmax fp32 [Q, O]) of a float kernel."""
  w = np.asarray(w_IO, np.float32)
  I, O = w.shape
  J = -(-I // BLOCK) * BLOCK
  w_QbO = np.pad(w, ((0, J - I), (0, 0))).reshape(J // BLOCK, BLOCK, O)
  absmax_QO = np.abs(w_QbO).max(axis=1)
  scaled = w_QbO / np.where(absmax_QO == 0, 1, absmax_QO)[:, None, :]
  # Nearest code: midpoints between neighbouring code values are the decision boundaries.
  idx = np.searchsorted((CODE_BOOK[1:] + CODE_BOOK[:-1]) / 2, scaled).astype(np.uint8).reshape(J, O)
  return (idx[0::2] << 4) | idx[1::2], absmax_QO.astype(np.float32)


SLOT = "quant"  # the Linear attribute an NF4 base sits in: its leaves are found at <linear>/quant/<leaf>


class NF4Weight(nnx.Module):
  """A kernel stored in NF4; `dequantize(dtype)` gives it back [I, O]."""

  # Codes and absmaxes are split along the kernel's axes (rows padded / packed / blocked, columns as they are);
  # the scales are frozen bookkeeping, not parameters of the model.
  LEAVES = (leaves.Leaf("codes", ("in", "out"), trains=False),
            leaves.Leaf("absmax", ("in", "out"), trains=False, counts=False),
            leaves.Leaf("absmax_q", ("in", "out"), trains=False, counts=False),
            leaves.Leaf("absmax_scale", (None,), trains=False, counts=False),
            leaves.Leaf("absmax_offset", (), trains=False, counts=False))

  def __init__(self, w_IO, *, double_quant: bool = False):
    codes, absmax_QO = quantize_codes(w_IO)
    self.shape = tuple(int(s) for s in np.shape(w_IO))
    self.codes = Quantized(jnp.asarray(codes))
    self.double_quant = bool(double_quant)
    if double_quant:
      offset = absmax_QO.mean()
      flat = (absmax_QO - offset).reshape(-1)
      n = -(-flat.size // SCALE_BLOCK) * SCALE_BLOCK
      blocks = np.pad(flat, (0, n - flat.size)).reshape(-1, SCALE_BLOCK)
      scale = np.abs(blocks).max(axis=1) / 127
      q = np.round(blocks / np.where(scale == 0, 1, scale)[:, None]).astype(np.int8)
      self.absmax_q = Quantized(jnp.asarray(q.reshape(-1)[:flat.size].reshape(absmax_QO.shape)))
      self.absmax_scale = Quantized(jnp.asarray(scale, jnp.float32))
      self.absmax_offset = Quantized(jnp.asarray(offset, jnp.float32))
    else:
      self.absmax = Quantized(jnp.asarray(absmax_QO))

  def absmax_QO(self):
    if not self.double_quant:
      return self.absmax[...]
    q_QO = self.absmax_q[...].astype(jnp.float32)
    Q, O = q_QO.shape
    scale = jnp.repeat(self.absmax_scale[...], SCALE_BLOCK)[:Q * O].reshape(Q, O)
    return q_QO * scale + self.absmax_offset[...]

  def dequantize(self, dtype=jnp.float32):
    I, O = self.shape
    codes = self.codes[...]
    idx_JO = jnp.stack([codes >> 4, codes & 15], axis=1).reshape(-1, O)
    vals_QbO = jnp.asarray(CODE_BOOK)[idx_JO].reshape(-1, BLOCK, O)
    w_JO = (vals_QbO * self.absmax_QO()[:, None, :]).reshape(-1, O)
    return w_JO[:I].astype(dtype)

  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(self)))


leaves.declare(SLOT, NF4Weight.LEAVES)
