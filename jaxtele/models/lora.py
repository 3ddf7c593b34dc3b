"""LoRA as a tree rewrite: adapter modules beside the base kernels, one filter deciding what trains.

`add_lora` attaches an adapter (a registered variant of models/adapters.py: lora / rslora scaling, dora, pissa)
under a name to the targeted `Linear`s, each initialised as its class says (LoRA: PEFT's Kaiming-uniform A and a
zero B, so the adapted model starts equal to the base; PiSSA moves W's top-R singular directions into A, B).
`trainable_filter` is the one rule used to split the state into what is differentiated, optimised and checkpointed, and what
stays frozen. `merge_lora` / `unmerge_lora` fold adapters into the kernels and back (exactly);
`quantize_base` stores the frozen kernels in NF4. Legend: I in features, O out features, R rank.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.errors import ArgumentError, JaxteleError
from jaxtele.models import leaves
from jaxtele.models.adapters import SLOT, VARIANTS, scaling
from jaxtele.models.decoder import Decoder
from jaxtele.models.layers import Linear
from jaxtele.models.quantize import NF4Weight

# PEFT's "all-linear": every linear layer except the output head.
ALL_LINEAR = "all-linear"
DEFAULT = "default"
QUANTIZERS = ("none", "nf4")


def module_name(path) -> str:
  return ".".join(str(p) for p in path)


def linears(model) -> dict:
  return {p: m for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def target_paths(model: Decoder, targets) -> list[tuple]:
  """Paths of the Linear modules that `targets` selects.

  `targets`: "all-linear"; module names, comma-separated ("q_proj,v_proj", as PEFT's target_modules);
  or "re:" and a regex matched against the full dotted path ("re:layers\\.[0-9]\\.self_attn\\..*").
  """
  found = linears(model)
  if targets == ALL_LINEAR:
    chosen = [p for p in found if p[0] != "lm_head"]
  elif targets.startswith("re:"):
    chosen = [p for p in found if re.fullmatch(targets[3:], module_name(p))]
  else:
    names = {t.strip() for t in targets.split(",") if t.strip()}
    unknown = names - {str(p[-1]) for p in found}
    if unknown:
      raise ArgumentError("targets", f"no linear layer named {sorted(unknown)[0]!r}")
    chosen = [p for p in found if p[-1] in names]
  if not chosen:
    raise ArgumentError("targets", f"{targets!r} selects no linear layer")
  return chosen


lora_scale = scaling


def add_lora(model: Decoder, rank: int, alpha: float, targets=ALL_LINEAR, seed: int = 0, rslora: bool = False,
             variant: str = "lora", dropout: float = 0.0, name: str = DEFAULT) -> list[tuple]:
  """Attach adapter `name` in place (and make it active); returns the adapted module paths."""
  if rank <= 0:
    raise ArgumentError("rank", f"must be positive, got {rank}")
  if variant not in VARIANTS:
    raise ArgumentError("variant", f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
  if not 0.0 <= dropout < 1.0:
    raise ArgumentError("dropout", f"must be in [0, 1), got {dropout}")
  paths = target_paths(model, targets)
  key = jax.random.key(seed)
  modules = linears(model)
  scale = scaling(rank, alpha, rslora)
  for i, path in enumerate(paths):
    adapter = VARIANTS[variant].initialise(modules[path], rank=rank, scale=scale, key=jax.random.fold_in(key, i),
                                           dropout=dropout, where=module_name(path))
    attach(modules[path], name, adapter)
  return paths


def check_name(name: str):
  # Adapters are attributes of an nnx.Dict: a name must be an identifier that is not one of its methods.
  if not (isinstance(name, str) and name.isidentifier() and not hasattr(nnx.Dict, name)):
    raise JaxteleError(f"adapter name {name!r}: must be a Python identifier other than a dict method")


def attach(lin: Linear, name: str, adapter):
  """Put `adapter` under `name`, or copy its weights into the one already there (same shapes: no recompile)."""
  check_name(name)
  old = lin.adapters.get(name)
  shapes = lambda a: jax.tree.map(jnp.shape, nnx.state(a, nnx.LoRAParam))
  if old is not None and type(old) is type(adapter) and old.scale == adapter.scale and shapes(old) == shapes(adapter):
    old.assign(adapter)
  else:
    lin.adapters[name] = adapter
  if lin.active is None:
    lin.active = name


def lora_paths(model: Decoder, name: str | None = None) -> list[tuple]:
  """Paths of the Linears holding adapter `name` (any adapter when None)."""
  return [p for p, m in linears(model).items() if (name in m.adapters if name is not None else len(m.adapters))]


def adapter_names(model: Decoder) -> list[str]:
  return sorted({n for m in linears(model).values() for n in m.adapters})


def set_active(model: Decoder, name: str | None):
  """The adapter every Linear uses when a call names none (None: the bare base)."""
  if name is not None and name not in adapter_names(model):
    raise JaxteleError(f"adapter {name!r}: not loaded (loaded: {', '.join(adapter_names(model)) or 'none'})")
  for lin in linears(model).values():
    lin.active = name


def trainable_filter(mode: str, extra: str = ""):
  """The filter over (path, variable) that says what trains.

  full: every parameter. lora: adapter leaves only (note LoRAParam subclasses Param, so it is named
  explicitly; DoRA's magnitude is a LoRAParam too), plus base parameters whose dotted path matches the
  `extra` regex (norms, embeddings). Quantized storage and adapters' frozen state are never Params.
  """
  if mode == "full":
    return nnx.Param
  if mode != "lora":
    raise ArgumentError("mode", f"unknown mode {mode!r} (choose from full, lora)")
  if not extra:
    return nnx.LoRAParam
  pattern = re.compile(extra)

  def extra_base(path, var):
    return isinstance(var, nnx.Param) and bool(pattern.search(module_name(path)))

  return nnx.Any(nnx.LoRAParam, extra_base)


def dequantize_base(model: Decoder, dtype=jnp.float32) -> Decoder:
  """NF4 kernels back to float Params (in place)."""
  for lin in linears(model).values():
    if lin.quant is not None:
      lin.kernel = nnx.Param(lin.quant.dequantize(dtype))
      lin.quant = nnx.data(None)
  return model


def quantize_base(model: Decoder, targets=ALL_LINEAR, double_quant: bool = False) -> Decoder:
  """Store the targeted kernels in NF4 (QLoRA): in place, before or after adding adapters."""
  for path in target_paths(model, targets):
    lin = linears(model)[path]
    if lin.quant is None:
      lin.quant = NF4Weight(np.asarray(lin.kernel[...], np.float32), double_quant=double_quant)
      lin.kernel = nnx.data(None)
  return model


def _check_float_base(model, dequantize: bool, what: str):
  quantized = [p for p, m in linears(model).items() if m.quant is not None]
  if quantized and not dequantize:
    raise JaxteleError(f"{module_name(quantized[0])}: the base is NF4-quantized; {what} needs dequantize=True "
                       "(a float export of a quantized base)")
  dequantize_base(model)


def merge_lora(model: Decoder, name: str | None = None, *, keep: bool = False, dequantize: bool = False) -> Decoder:
  """Fold adapter `name` (default: each Linear's active one) into its kernel, in fp32. `keep=True` keeps the
  adapter (and the pre-merge kernel) so `unmerge_lora` restores the base bit for bit; else adapters are dropped."""
  _check_float_base(model, dequantize, "merging")
  for lin in linears(model).values():
    chosen = name or lin.active
    if chosen is not None and chosen in lin.adapters and not lin.adapters[chosen].merged:
      merged = lin.adapters[chosen].merge_into(lin.kernel[...])
      lin.kernel = nnx.Param(merged)
    if not keep:
      lin.drop_adapters()
  return model


def unmerge_lora(model: Decoder) -> Decoder:
  """Undo `merge_lora(keep=True)`: every merged adapter gives back the exact pre-merge kernel."""
  for lin in linears(model).values():
    for adapter in lin.adapters.values():
      if adapter.merged:
        lin.kernel = nnx.Param(adapter.unmerge(lin.kernel[...]))
  return model


def strip_adapters(model: Decoder) -> Decoder:
  """The original base without adapters, in place: merged ones unmerged, and what an adapter took over from W
  at init given back (a PiSSA residual gets its top-R part back)."""
  unmerge_lora(model)
  for lin in linears(model).values():
    for adapter in lin.adapters.values():
      initial_IO = adapter.initial_delta()
      if initial_IO is not None:
        lin.kernel.set_value((lin.kernel[...].astype(jnp.float32) + initial_IO).astype(lin.kernel.dtype))
    lin.drop_adapters()
  return model


# --- Base modules trained beside the adapters: embeddings, head, anything an `extra` regex names. ---

EMBED, HEAD = "embed_tokens", "lm_head"


def extra_pattern(extra: str = "", modules=()) -> str:
  """One regex over dotted parameter paths: the `extra` regex plus the whole modules named (EMBED, HEAD)."""
  parts = [extra or ""]
  for m in modules:
    parts.append(r"^embed_tokens\.embedding$" if m == EMBED else r"^lm_head\.(kernel|bias)$")
  return "|".join(f"(?:{p})" for p in parts if p)


def param_paths(model) -> list[str]:
  return [module_name(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def check_extra(model, extra: str):
  """A requested extra that selects no parameter is an error, not a run that silently trains adapters only."""
  if extra and not any(re.search(extra, p) for p in param_paths(model)):
    raise ArgumentError("extra", f"{extra!r} matches no parameter of this model")


def group_of(path: str) -> str:
  if f".{SLOT}." in f".{path}.":
    return "adapters"
  if path.startswith(EMBED + "."):
    return "embeddings"
  if path.startswith(HEAD + "."):
    return "head"
  return "norms" if any("norm" in part for part in path.split(".")) else "base"


def trainable_table(trainable: dict, frozen: dict, tied: bool = False) -> list[str]:
  """Lines of a table: parameters by group (adapters, embeddings, head, norms, base), trained and frozen."""
  counts = {g: [0, 0] for g in ("adapters", "embeddings", "head", "norms", "base")}
  for col, tree in ((0, trainable), (1, frozen)):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
      declared = leaves.spec(names)
      if declared is None or declared.counts:  # frozen bookkeeping (a pre-merge kernel, NF4 scales) is no parameter
        counts[group_of(".".join(names))][col] += int(np.prod(x.shape))
  lines = [f"{'group':<11}{'trained':>14}{'frozen':>14}"]
  for g, (t, f) in counts.items():
    note = "  (tied: the head is the embedding)" if tied and g == "embeddings" else ""
    lines.append(f"{g:<11}{t:>14,}{f:>14,}{note}")
  return lines
