"""Adapter modules a `Linear` holds by name, and what selects them at call time.

A variant is one class, registered by name (`@register`, config `lora.variant`). It owns its leaves, declared
as `leaves.Leaf` records (sharding axes, LoRA+ group, gradient-norm group, PEFT tensor name), its init, its
contribution to the layer's output, how it merges into (and unmerges from) the kernel, and its PEFT side
(config fields, tensors, `from_peft`). It reads the base weight only through `lin.base_kernel(dtype)`, so a
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
import numpy as np
from flax import nnx

from jaxtele.errors import JaxteleError
from jaxtele.models import leaves

SLOT = "adapters"  # the Linear attribute adapters sit in: their leaves are found at <linear>/adapters/<name>/<leaf>
RSLORA = "use_rslora"  # the PEFT config field of rsLoRA's scaling, alpha / sqrt(R)


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


def scaling(rank: int, alpha: float, rslora: bool) -> float:
  """The adapter scale s: alpha / R, or alpha / sqrt(R) for rsLoRA (Kalajdzievski 2023)."""
  return alpha / (rank**0.5 if rslora else rank)


def uses_rslora(peft_config: dict) -> bool:
  return bool(peft_config.get(RSLORA))


def kaiming_factors(shape, rank: int, key):
  """PEFT's default init: A [I, R] Kaiming-uniform (bound 1 / sqrt(I)), B [R, O] zero: the layer starts as its base."""
  d_in, d_out = shape
  bound = 1.0 / d_in**0.5
  return (jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound), jnp.zeros((rank, d_out), jnp.float32))


VARIANTS = {}  # lora.variant -> adapter class


def register(cls):
  """Class decorator: `cls` becomes the variant `cls.variant` (config `lora.variant`, `add_lora`, PEFT import)
  and its `LEAVES` are declared, so sharding, optimizer, metrics and conversion know them."""
  leaves.declare(SLOT, cls.LEAVES)
  VARIANTS[cls.variant] = cls
  return cls


def peft_class(peft_config: dict, where: str):
  """The first registered variant that reads a PEFT adapter whose config has its `PEFT_FIELDS` values."""
  for cls in VARIANTS.values():
    if cls.loads_peft and all((peft_config.get(k) or False) == v for k, v in cls.PEFT_FIELDS.items()):
      return cls
  raise JaxteleError(f"{where}: no adapter variant reads this PEFT config")


def peft_leaves() -> dict:
  """{PEFT tensor suffix: Leaf} over every registered variant."""
  return leaves.peft_leaves(SLOT)


# Every adapter keeps its pre-merge kernel while merged (frozen, never counted as a parameter).
PREMERGE = leaves.Leaf("premerge", ("in", "out"), trains=False, counts=False)


@register
class LoraAdapter(nnx.Module):
  """delta = scale * dropout(x) @ lora_a @ lora_b; PEFT stores lora_A [R, I], lora_B [O, R] (transposes).

  The protocol a variant follows (override what differs): `LEAVES` (every leaf it may hold), `initialise`,
  `__call__` / `delta_kernel` / `merged_kernel`, `initial_delta`, `factors`, `max_update_rank`, and the PEFT
  side: `PEFT_FIELDS` (its adapter_config.json fields), `loads_peft`, `peft_rank`, `peft_tensors`, `from_peft`
  (the constructor takes its PEFT leaves first, in `LEAVES` order)."""

  variant = "lora"
  LEAVES = (leaves.Leaf("lora_a", ("in", None), peft="lora_A.weight"),
            leaves.Leaf("lora_b", (None, "out"), plus=True, peft="lora_B.weight"), PREMERGE)
  PEFT_FIELDS = {"use_dora": False}
  loads_peft = True  # a PEFT folder with these fields loads as this class
  quantize_after_init = False  # True: its init reads the float base, so an NF4 base is quantized after it

  def __init__(self, a_IR, b_RO, *, scale: float, dropout: float = 0.0):
    self.lora_a = nnx.LoRAParam(jnp.asarray(a_IR))
    self.lora_b = nnx.LoRAParam(jnp.asarray(b_RO))
    self.scale = float(scale)
    self.dropout = float(dropout)
    self.premerge = nnx.data(None)

  @classmethod
  def initialise(cls, lin, *, rank: int, scale: float, key, dropout: float = 0.0, where: str = ""):
    """A new adapter for Linear `lin` (which a variant may change: PiSSA moves part of W into its factors)."""
    del where
    return cls(*kaiming_factors(lin.shape, rank, key), scale=scale, dropout=dropout)

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

  def initial_delta(self):
    """The part of the original base W this adapter took over at init [I, O] fp32 (None: none)."""
    return None

  def factors(self):
    """(A [I, R], B [R, O]): the low-rank factors a gradient step moves W through (diagnose's reach)."""
    return self.lora_a[...], self.lora_b[...]

  def max_update_rank(self, shape) -> int:
    """The most rank its update W' - W0 of a kernel of `shape` can have."""
    return min(min(shape), self.rank)

  @property
  def peft_rank(self) -> int:
    return self.rank

  def peft_alpha(self, rslora: bool) -> float:
    """PEFT's lora_alpha that gives back this adapter's scale at `peft_rank`."""
    r = self.peft_rank
    return self.scale * (r**0.5 if rslora else r)

  def peft_tensors(self) -> dict:
    return {leaf.peft: getattr(self, leaf.name)[...].T for leaf in self.LEAVES if leaf.peft}

  def peft_config(self) -> dict:
    return {**self.PEFT_FIELDS, "init_lora_weights": True}

  @classmethod
  def from_peft(cls, tensors: dict, lin, *, scale: float, dropout: float = 0.0):
    del lin
    return cls(*(tensors[leaf.peft].T for leaf in cls.LEAVES if leaf.peft), scale=scale, dropout=dropout)

  @staticmethod
  def stacked_factors(parts, ranks, shape, scale: float):
    """A blocks [I, r_i] and B blocks [r_i, O] of `parts` [(adapter or None where absent, weight w_i)] for one
    adapter of scale s: A_i and c_i B_i with c_i = w_i s_i / s, zero-padded to `ranks` (numpy)."""
    d_in, d_out = shape
    a_blocks, b_blocks = [], []
    for (ad, w), r in zip(parts, ranks, strict=True):
      a_IR, b_RO = np.zeros((d_in, r), np.float32), np.zeros((r, d_out), np.float32)
      if ad is not None:
        a_IR[:, :ad.rank] = np.asarray(ad.lora_a[...], np.float32)
        b_RO[:ad.rank] = np.asarray(ad.lora_b[...], np.float32) * np.float32(w * ad.scale / scale)
      a_blocks.append(a_IR)
      b_blocks.append(b_RO)
    return a_blocks, b_blocks

  def linear_merge(self, parts, ranks, shape, scale: float):
    """sum_i w_i delta_i of adapters of this variant on one layer (this one among them), exactly, as one adapter
    of scale `scale`: A = [A_1 | A_2 ...], B = [c_1 B_1 ; c_2 B_2 ...] (see `stacked_factors`)."""
    a_blocks, b_blocks = self.stacked_factors(parts, ranks, shape, scale)
    return type(self)(np.concatenate(a_blocks, 1), np.concatenate(b_blocks, 0), scale=scale, dropout=self.dropout)

  def assign(self, other: "LoraAdapter"):
    """Take `other`'s weights in place (same shapes: the jitted forward is reused)."""
    for name, var in vars(other).items():
      if isinstance(var, nnx.LoRAParam):
        getattr(self, name).set_value(var[...])


@register
class DoraAdapter(LoraAdapter):
  """DoRA (Liu et al. 2024) as PEFT computes it: W' = m / ||W + s B A||_col * (W + s B A), the norm per output
  feature taken without gradient; so delta = (m/n - 1) * x W + (m/n) * s * x A B."""

  variant = "dora"
  LEAVES = LoraAdapter.LEAVES + (leaves.Leaf("lora_magnitude", ("out",), peft="lora_magnitude_vector"),)
  PEFT_FIELDS = {"use_dora": True}

  def __init__(self, a_IR, b_RO, magnitude_O, *, scale: float, dropout: float = 0.0):
    super().__init__(a_IR, b_RO, scale=scale, dropout=dropout)
    self.lora_magnitude = nnx.LoRAParam(jnp.asarray(magnitude_O))

  @classmethod
  def initialise(cls, lin, *, rank: int, scale: float, key, dropout: float = 0.0, where: str = ""):
    """The magnitude starts as W's column norms (B = 0), so the layer starts as its base."""
    a_IR, b_RO = kaiming_factors(lin.shape, rank, key)
    return cls(a_IR, b_RO, cls.column_norm(lin.base_kernel(jnp.float32), 0.0), scale=scale, dropout=dropout)

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

  def max_update_rank(self, shape) -> int:
    return min(shape)  # the magnitude rescales every output column of W: any rank

  def linear_merge(self, parts, ranks, shape, scale: float):
    """Directions as LoRA's; magnitudes as sum_i w_i m_i."""
    a_blocks, b_blocks = self.stacked_factors(parts, ranks, shape, scale)
    mag_O = sum(w * np.asarray(ad.lora_magnitude[...], np.float32) for ad, w in parts if ad is not None)
    return DoraAdapter(np.concatenate(a_blocks, 1), np.concatenate(b_blocks, 0), mag_O, scale=scale,
                       dropout=self.dropout)


def pissa_factors(w_IO, rank: int, scale: float):
  """A [I, R], B [R, O] with s * A @ B = W's top-R part (PEFT: sqrt of the singular values / s on each side)."""
  u_IK, s_K, vt_KO = np.linalg.svd(np.asarray(w_IO, np.float64), full_matrices=False)
  root_R = np.sqrt(s_K[:rank] / scale)
  return (u_IK[:, :rank] * root_R).astype(np.float32), (root_R[:, None] * vt_KO[:rank]).astype(np.float32)


@register
class PissaAdapter(LoraAdapter):
  """PiSSA: A, B start as the top-R singular directions of W (the base keeps the residual). The initial
  factors are kept (frozen) so the adapter converts to a plain LoRA against the ORIGINAL base, as PEFT does:
  W + dW = W_res + s A B with W = W_res + s A0 B0  =>  dW = s [A | A0] [B ; -B0] (rank 2R)."""

  variant = "pissa"
  LEAVES = LoraAdapter.LEAVES + (leaves.Leaf("lora_a0", ("in", None), trains=False, counts=False),
                                 leaves.Leaf("lora_b0", (None, "out"), trains=False, counts=False))
  loads_peft = False  # PEFT saves PiSSA as the plain LoRA above
  quantize_after_init = True  # the SVD of the float base; the residual is quantized, as PEFT advises

  def __init__(self, a_IR, b_RO, *, scale: float, dropout: float = 0.0):
    super().__init__(a_IR, b_RO, scale=scale, dropout=dropout)
    self.lora_a0 = Frozen(jnp.asarray(a_IR, jnp.float32))
    self.lora_b0 = Frozen(jnp.asarray(b_RO, jnp.float32))

  @classmethod
  def initialise(cls, lin, *, rank: int, scale: float, key, dropout: float = 0.0, where: str = ""):
    """A, B from W's SVD; `lin`'s kernel becomes the residual W - s A0 B0."""
    del key
    if lin.quant is not None:
      raise JaxteleError(f"{where}: PiSSA needs a float base (quantize the residual after init)")
    adapter = cls(*pissa_factors(lin.kernel[...], rank, scale), scale=scale, dropout=dropout)
    lin.kernel.set_value((lin.kernel[...].astype(jnp.float32) - adapter.initial_delta()).astype(lin.kernel.dtype))
    return adapter

  def initial_delta(self):
    return self.scale * (self.lora_a0[...] @ self.lora_b0[...])

  def max_update_rank(self, shape) -> int:
    return min(min(shape), 2 * self.rank)  # s (A B - A0 B0)

  @property
  def peft_rank(self) -> int:
    return 2 * self.rank

  def linear_merge(self, parts, ranks, shape, scale: float):
    """The initial factors are added once more with weight 1 - sum_i w_i, so the delta from the ORIGINAL base is
    still sum_i w_i delta_i; the merged adapter keeps this one's initial factors."""
    a_blocks, b_blocks = self.stacked_factors(parts, ranks, shape, scale)
    rest = 1.0 - sum(w for ad, w in parts if ad is not None)
    a0_IR, b0_RO = np.asarray(self.lora_a0[...]), np.asarray(self.lora_b0[...])
    merged = PissaAdapter(np.concatenate(a_blocks + [a0_IR], 1),
                          np.concatenate(b_blocks + [b0_RO * np.float32(rest * self.scale / scale)], 0),
                          scale=scale, dropout=self.dropout)
    merged.lora_a0, merged.lora_b0 = Frozen(jnp.asarray(a0_IR)), Frozen(jnp.asarray(b0_RO))
    return merged

  def peft_tensors(self) -> dict:
    a = jnp.concatenate([self.lora_a[...].astype(jnp.float32), self.lora_a0[...]], axis=1)
    b = jnp.concatenate([self.lora_b[...].astype(jnp.float32), -self.lora_b0[...]], axis=0)
    return {"lora_A.weight": a.T, "lora_B.weight": b.T}


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
