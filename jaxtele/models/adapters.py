"""Adapter modules a `Linear` holds by name, and what selects them at call time.

An adapter owns its leaves, its contribution to the layer's output, how it merges into (and unmerges from)
the kernel, and its PEFT tensor names. It reads the base weight only through `lin.base_kernel(dtype)`, so a
quantized base (models/quantize.py) needs no adapter code. Leaves live at `<linear>/adapters/<name>/<leaf>`.
Legend: B batch, T length, I in features, O out features, R rank.

Per call, `adapter_inputs(...)` (a context around the model call) can pass a dropout key (training) or
per-row adapter ids (a mixed batch: row b uses adapter `names[adapter_ids_B[b]]`, -1 = the bare base).
Without it, each Linear uses its `active` adapter and dropout is off (evaluation).
"""

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

# Each adapter leaf's axes in terms of its kernel's (`in`, `out`): sharding reads this, so an adapter's
# leaves follow the spec of the kernel they sit beside. The quantized base's leaves are listed too.
LEAF_AXES = {
    "lora_a": ("in", None), "lora_b": (None, "out"), "lora_magnitude": ("out",),
    "lora_a0": ("in", None), "lora_b0": (None, "out"), "premerge": ("in", "out"),
    "codes": ("in", "out"), "absmax": ("in", "out"), "absmax_q": ("in", "out"),
    "absmax_scale": (None,), "absmax_offset": (),
}


class Frozen(nnx.Variable):
  """State an adapter keeps that never trains and is never cast: PiSSA's initial factors, a pre-merge kernel."""


@dataclasses.dataclass
class _Inputs:
  adapter_ids_B: jax.Array | None = None
  names: tuple = ()
  dropout_key: jax.Array | None = None
  calls: int = 0

  def next_key(self):
    # One key per adapter call, in trace order: distinct masks per layer, the same ones under remat/scan.
    self.calls += 1
    return jax.random.fold_in(self.dropout_key, self.calls)


_INPUTS = contextvars.ContextVar("jaxtele_adapter_inputs", default=None)


@contextlib.contextmanager
def adapter_inputs(*, adapter_ids_B=None, names=(), dropout_key=None):
  """Around a model call (inside the traced function): dropout on adapter inputs with `dropout_key`, and/or
  a mixed batch where row b runs adapter `names[adapter_ids_B[b]]` (-1: no adapter)."""
  token = _INPUTS.set(_Inputs(adapter_ids_B, tuple(names), dropout_key))
  try:
    yield
  finally:
    _INPUTS.reset(token)


def dropout_calls():
  """The dropout call counter of the current `adapter_inputs` (None without dropout): a scanned layer stack
  (models/scan.py) carries it through the scan so keys match the unrolled loop's."""
  ctx = _INPUTS.get()
  return ctx.calls if ctx is not None and ctx.dropout_key is not None else None


def set_dropout_calls(calls):
  if calls is not None:
    _INPUTS.get().calls = calls


def dropout(x, rate: float, key):
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class LoraAdapter(nnx.Module):
  """delta = scale * dropout(x) @ lora_a @ lora_b; PEFT stores lora_A [R, I], lora_B [O, R] (transposes)."""

  variant = "lora"

  def __init__(self, a_IR, b_RO, *, scale: float, dropout: float = 0.0):
    self.lora_a = nnx.LoRAParam(jnp.asarray(a_IR))
    self.lora_b = nnx.LoRAParam(jnp.asarray(b_RO))
    self.scale = float(scale)
    self.dropout = float(dropout)
    self.premerge = nnx.data(None)

  @property
  def rank(self) -> int:
    return self.lora_a.shape[1]

  @property
  def merged(self) -> bool:
    return self.premerge is not None

  def delta_kernel(self):
    """scale * A @ B [I, O] in fp32."""
    return self.scale * (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))

  def __call__(self, x_BTI, lin, base_BTO, key=None):
    x_BTI = dropout(x_BTI, self.dropout, key)
    z_BTR = x_BTI @ self.lora_a[...].astype(x_BTI.dtype)
    return self.scale * (z_BTR @ self.lora_b[...].astype(x_BTI.dtype))

  def merged_kernel(self, w_IO):
    return w_IO.astype(jnp.float32) + self.delta_kernel()

  def merge_into(self, kernel_IO):
    """The merged kernel in fp32; the pre-merge kernel is kept, so `unmerge` is exact."""
    self.premerge = Frozen(kernel_IO)
    return self.merged_kernel(kernel_IO)

  def unmerge(self, kernel_IO):
    del kernel_IO  # restored, not recomputed: W + d - d is not W in floating point
    w_IO = self.premerge[...]
    self.premerge = nnx.data(None)
    return w_IO

  def peft_tensors(self) -> dict:
    return {"lora_A.weight": self.lora_a[...].T, "lora_B.weight": self.lora_b[...].T}

  def peft_config(self) -> dict:
    return {"use_dora": False, "init_lora_weights": True}

  @classmethod
  def from_peft(cls, tensors: dict, lin, *, scale: float, dropout: float = 0.0):
    del lin
    return cls(tensors["lora_A.weight"].T, tensors["lora_B.weight"].T, scale=scale, dropout=dropout)

  def assign(self, other: "LoraAdapter"):
    """Take `other`'s weights in place (same shapes: the jitted forward is reused)."""
    for name, var in vars(other).items():
      if isinstance(var, nnx.LoRAParam):
        getattr(self, name).set_value(var[...])


class DoraAdapter(LoraAdapter):
  """DoRA (Liu et al. 2024) as PEFT computes it: W' = m / ||W + s B A||_col * (W + s B A), the norm per output
  feature taken without gradient; so delta = (m/n - 1) * x W + (m/n) * s * x A B."""

  variant = "dora"

  def __init__(self, a_IR, b_RO, magnitude_O, *, scale: float, dropout: float = 0.0):
    super().__init__(a_IR, b_RO, scale=scale, dropout=dropout)
    self.lora_magnitude = nnx.LoRAParam(jnp.asarray(magnitude_O))

  @staticmethod
  def column_norm(w_IO, delta_IO):
    return jnp.linalg.norm(w_IO.astype(jnp.float32) + delta_IO, axis=0)

  def __call__(self, x_BTI, lin, base_BTO, key=None):
    w_IO = lin.base_kernel(jnp.float32)
    norm_O = jax.lax.stop_gradient(self.column_norm(w_IO, self.delta_kernel()))
    mag_O = (self.lora_magnitude[...].astype(jnp.float32) / norm_O).astype(x_BTI.dtype)
    if key is not None and self.dropout > 0:
      x_BTI = dropout(x_BTI, self.dropout, key)
      base_BTO = x_BTI @ w_IO.astype(x_BTI.dtype)
    lora_BTO = super().__call__(x_BTI, lin, base_BTO)
    return (mag_O - 1) * base_BTO + mag_O * lora_BTO

  def merged_kernel(self, w_IO):
    full_IO = w_IO.astype(jnp.float32) + self.delta_kernel()
    return (self.lora_magnitude[...].astype(jnp.float32) / jnp.linalg.norm(full_IO, axis=0)) * full_IO

  def peft_tensors(self) -> dict:
    return {**super().peft_tensors(), "lora_magnitude_vector": self.lora_magnitude[...]}

  def peft_config(self) -> dict:
    return {"use_dora": True, "init_lora_weights": True}

  @classmethod
  def from_peft(cls, tensors: dict, lin, *, scale: float, dropout: float = 0.0):
    del lin
    return cls(tensors["lora_A.weight"].T, tensors["lora_B.weight"].T, tensors["lora_magnitude_vector"],
               scale=scale, dropout=dropout)


class PissaAdapter(LoraAdapter):
  """PiSSA: A, B start as the top-R singular directions of W (the base keeps the residual). The initial
  factors are kept (frozen) so the adapter converts to a plain LoRA against the ORIGINAL base, as PEFT does:
  W + dW = W_res + s A B with W = W_res + s A0 B0  =>  dW = s [A | A0] [B ; -B0] (rank 2R)."""

  variant = "pissa"

  def __init__(self, a_IR, b_RO, *, scale: float, dropout: float = 0.0):
    super().__init__(a_IR, b_RO, scale=scale, dropout=dropout)
    self.lora_a0 = Frozen(jnp.asarray(a_IR, jnp.float32))
    self.lora_b0 = Frozen(jnp.asarray(b_RO, jnp.float32))

  def initial_delta(self):
    return self.scale * (self.lora_a0[...] @ self.lora_b0[...])

  def peft_tensors(self) -> dict:
    a = jnp.concatenate([self.lora_a[...].astype(jnp.float32), self.lora_a0[...]], axis=1)
    b = jnp.concatenate([self.lora_b[...].astype(jnp.float32), -self.lora_b0[...]], axis=0)
    return {"lora_A.weight": a.T, "lora_B.weight": b.T}

  def peft_config(self) -> dict:
    return {"use_dora": False, "init_lora_weights": True}


VARIANTS = {"lora": LoraAdapter, "dora": DoraAdapter, "pissa": PissaAdapter}


def delta(lin, x_BTI, base_BTO):
  """The adapters' contribution to `lin`'s output for this call (0 when none applies)."""
  live = {name: a for name, a in lin.adapters.items() if not a.merged}
  ctx = _INPUTS.get()
  if not live:
    return 0
  key = lambda: ctx.next_key() if ctx is not None and ctx.dropout_key is not None else None
  if ctx is not None and ctx.adapter_ids_B is not None:
    out_BTO = 0
    for i, name in enumerate(ctx.names):
      if name in live:
        rows_B = ctx.adapter_ids_B == i
        out_BTO = out_BTO + jnp.where(rows_B[:, None, None], live[name](x_BTI, lin, base_BTO, key()), 0)
    return out_BTO
  if lin.active not in live:
    return 0
  return live[lin.active](x_BTI, lin, base_BTO, key())
