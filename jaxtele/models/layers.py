"""Building blocks: a linear layer that may carry adapters, RMSNorm, and the token embedding.

Leaf names mirror Hugging Face (`kernel` is the transpose of HF's `weight`), so conversion is a mapping.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtele.models import adapters

# The gated MLP's activation by its HF `hidden_act` name: SwiGLU (Llama, Qwen) and GeGLU (Gemma).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def normal_init(key, shape, dtype, std=0.02):
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = x @ W (+ bias) + the active adapter's contribution.

  W is read through `base_kernel(dtype)`: the `kernel` [I, O] Param, or an NF4 `quant` storage when the
  frozen base is quantized. Adapters (models/adapters.py) sit in `adapters` by name; without any this is
  a plain dense layer, which is what full fine-tuning trains.
  """

  def __init__(self, in_features, out_features, *, use_bias, dtype, param_dtype, rngs):
    self.kernel = nnx.Param(normal_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
    self.quant = nnx.data(None)
    self.adapters = nnx.Dict()
    self.active = None  # the adapter name used when a call names none
    self.dtype = dtype

  @property
  def shape(self):
    return self.kernel.shape if self.quant is None else self.quant.shape

  def base_kernel(self, dtype=None):
    w_IO = self.kernel[...] if self.quant is None else self.quant.dequantize(jnp.float32)
    return w_IO.astype(dtype or self.dtype)

  def effective_kernel(self, dtype=None, name: str | None = None):
    """The kernel [I, O] this layer applies with adapter `name` (default: the active one): its merged kernel
    over `base_kernel`, computed in fp32; the base itself without one (or when it is already merged in)."""
    adapter = self.adapters.get(name or self.active) if (name or self.active) is not None else None
    if adapter is None or adapter.merged:
      return self.base_kernel(dtype)
    return adapter.merged_kernel(self.base_kernel(jnp.float32)).astype(dtype or self.dtype)

  def drop_adapters(self):
    self.adapters = nnx.Dict()
    self.active = None

  def make_plain(self, w_IO):
    """This layer as a plain dense one holding `w_IO`: no adapter, no NF4 base."""
    self.kernel = nnx.Param(w_IO)
    self.quant = nnx.data(None)
    self.drop_adapters()

  def __call__(self, x_BTI):
    x_BTI = x_BTI.astype(self.dtype)
    base_BTO = x_BTI @ self.base_kernel(self.dtype)
    y_BTO = base_BTO + adapters.delta(self, x_BTI, base_BTO)
    if self.bias is not None:
      y_BTO = y_BTO + self.bias[...].astype(self.dtype)
    return y_BTO


class RMSNorm(nnx.Module):
  """x / rms(x) * (offset + scale). Llama-style (offset 0) multiplies in the input dtype as HF does; Gemma-style
  (offset 1, scale initialised to 0) multiplies in fp32 and casts last, as HF's GemmaRMSNorm does."""

  def __init__(self, dim, *, eps, param_dtype, offset: float = 0.0):
    self.scale = nnx.Param((jnp.zeros if offset else jnp.ones)((dim,), param_dtype))
    self.eps = eps
    self.offset = offset

  def __call__(self, x_BTD):
    # Normalise in fp32 whatever the compute dtype, as HF does.
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return (x32 * (self.offset + self.scale[...].astype(jnp.float32))).astype(x_BTD.dtype)
    return self.scale[...].astype(x_BTD.dtype) * x32.astype(x_BTD.dtype)


class Embed(nnx.Module):
  """Token embedding; `scale` (Gemma: sqrt(D)) multiplies the looked-up rows in the compute dtype, as HF does."""

  def __init__(self, vocab, dim, *, dtype, param_dtype, rngs, scale: float | None = None):
    self.embedding = nnx.Param(normal_init(rngs.params(), (vocab, dim), param_dtype))
    self.dtype = dtype
    self.scale = scale

  def __call__(self, tokens_BT):
    x_BTD = jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)
    return x_BTD if self.scale is None else x_BTD * jnp.float32(self.scale).astype(self.dtype)

  def attend(self, x_BTD):
    """Logits through the tied embedding."""
    return x_BTD.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T
