"""LoRA as a tree rewrite: low-rank leaves beside the base kernel, one filter deciding what trains.

`add_lora` attaches `lora_a` [in, r] (PEFT's Kaiming-uniform init) and `lora_b` [r, out] (zeros, so
the adapted model starts equal to the base) to the targeted `Linear`s. `trainable_filter` is the one
rule used to split the state into what is differentiated, optimised and checkpointed, and what stays
frozen. `merge_lora` folds the adapters back into the kernels.
"""

import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtele.errors import JaxteleError
from jaxtele.models.decoder import Decoder
from jaxtele.models.layers import Linear

# PEFT's "all-linear": every linear layer except the output head.
ALL_LINEAR = "all-linear"


def module_name(path) -> str:
  return ".".join(str(p) for p in path)


def target_paths(model: Decoder, targets) -> list[tuple]:
  """Paths of the Linear modules that `targets` selects.

  `targets`: "all-linear"; module names, comma-separated ("q_proj,v_proj", as PEFT's target_modules);
  or "re:" and a regex matched against the full dotted path ("re:layers\\.[0-9]\\.self_attn\\..*").
  """
  linears = [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]
  if targets == ALL_LINEAR:
    chosen = [p for p, _ in linears if p[0] != "lm_head"]
  elif targets.startswith("re:"):
    chosen = [p for p, _ in linears if re.fullmatch(targets[3:], module_name(p))]
  else:
    names = {t.strip() for t in targets.split(",") if t.strip()}
    unknown = names - {str(p[-1]) for p, _ in linears}
    if unknown:
      raise JaxteleError(f"lora.targets: no linear layer named {sorted(unknown)[0]!r}")
    chosen = [p for p, _ in linears if p[-1] in names]
  if not chosen:
    raise JaxteleError(f"lora.targets: {targets!r} selects no linear layer")
  return chosen


def add_lora(model: Decoder, rank: int, alpha: float, targets=ALL_LINEAR, seed: int = 0,
             rslora: bool = False) -> list[tuple]:
  """Attach LoRA leaves in place; returns the adapted module paths."""
  if rank <= 0:
    raise JaxteleError(f"lora.rank: must be positive, got {rank}")
  paths = target_paths(model, targets)
  key = jax.random.key(seed)
  modules = dict(nnx.iter_modules(model))
  for i, path in enumerate(paths):
    lin = modules[path]
    d_in, d_out = lin.kernel.shape
    bound = 1.0 / d_in**0.5
    a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, rank), jnp.float32, -bound, bound)
    lin.lora_a = nnx.LoRAParam(a)
    lin.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), jnp.float32))
    lin.lora_scale = alpha / (rank**0.5 if rslora else rank)
  return paths


def lora_paths(model: Decoder) -> list[tuple]:
  return [p for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.lora_a is not None]


def trainable_filter(mode: str, extra: str = ""):
  """The filter over (path, variable) that says what trains.

  full: every parameter. lora: LoRA leaves only (note LoRAParam subclasses Param, so it is named
  explicitly), plus base parameters whose dotted path matches the `extra` regex (norms, embeddings).
  """
  if mode == "full":
    return nnx.Param
  if mode != "lora":
    raise JaxteleError(f"train.mode: unknown mode {mode!r} (choose from full, lora)")
  if not extra:
    return nnx.LoRAParam
  pattern = re.compile(extra)

  def extra_base(path, var):
    return isinstance(var, nnx.Param) and bool(pattern.search(module_name(path)))

  return nnx.Any(nnx.LoRAParam, extra_base)


def merge_lora(model: Decoder) -> Decoder:
  """Fold every adapter into its kernel (kernel + scale * A @ B, in fp32) and drop the LoRA leaves."""
  modules = dict(nnx.iter_modules(model))
  for path in lora_paths(model):
    lin = modules[path]
    delta = lin.lora_scale * (lin.lora_a[...].astype(jnp.float32) @ lin.lora_b[...].astype(jnp.float32))
    lin.kernel.set_value((lin.kernel[...].astype(jnp.float32) + delta).astype(lin.kernel[...].dtype))
    lin.lora_a = nnx.data(None)
    lin.lora_b = nnx.data(None)
    lin.lora_scale = 0.0
  return model
