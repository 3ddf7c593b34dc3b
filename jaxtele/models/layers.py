"""Building blocks: a linear layer that may carry LoRA leaves, RMSNorm, and the token embedding.

Leaf names mirror Hugging Face (`kernel` is the transpose of HF's `weight`), so conversion is a mapping.
"""

import jax
import jax.numpy as jnp
from flax import nnx


def normal_init(key, shape, dtype, std=0.02):
  return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias) (+ scale * x @ lora_a @ lora_b).

  The LoRA leaves are `nnx.LoRAParam`s that `models.lora.add_lora` attaches; without them this is a
  plain dense layer, which is what full fine-tuning trains.
  """

  def __init__(self, in_features, out_features, *, use_bias, dtype, param_dtype, rngs):
    self.kernel = nnx.Param(normal_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.data(nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None)
    # Declared as data so add_lora can later put LoRAParams here.
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_scale = 0.0
    self.dtype = dtype

  def __call__(self, x_BTI):
    x_BTI = x_BTI.astype(self.dtype)
    y_BTO = x_BTI @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y_BTO = y_BTO + self.bias[...].astype(self.dtype)
    if self.lora_a is not None:
      z_BTR = x_BTI @ self.lora_a[...].astype(self.dtype)
      y_BTO = y_BTO + self.lora_scale * (z_BTR @ self.lora_b[...].astype(self.dtype))
    return y_BTO


class RMSNorm(nnx.Module):
  def __init__(self, dim, *, eps, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x_BTD):
    # Normalise in fp32 whatever the compute dtype, as HF does.
    x32 = x_BTD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x_BTD.dtype) * x32.astype(x_BTD.dtype)


class Embed(nnx.Module):
  def __init__(self, vocab, dim, *, dtype, param_dtype, rngs):
    self.embedding = nnx.Param(normal_init(rngs.params(), (vocab, dim), param_dtype))
    self.dtype = dtype

  def __call__(self, tokens_BT):
    return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

  def attend(self, x_BTD):
    """Logits through the tied embedding."""
    return x_BTD.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T
