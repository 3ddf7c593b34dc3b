"""Several adapters on one base combined into one adapter, or folded into the base (a merged model).

Each adapter i is a task vector per layer, d_i = W_i' - W (its merged kernel minus the ORIGINAL base: a PiSSA
residual gets its initial top-R part back first). Methods, with weights w_i:
  linear  sum_i w_i d_i. As an adapter this is exact, not refitted: A = [A_1 | A_2 ...], B = [c_1 B_1 ; c_2 B_2 ...]
          with c_i = w_i s_i / s (s: the first adapter's scale), zero-padded to one rank for every layer. DoRA
          merges its directions the same way and its magnitudes as sum_i w_i m_i; PiSSA adds its initial factors
          once more with weight 1 - sum_i w_i, so the delta from the original base is still sum_i w_i d_i.
  ties    TIES-Merging (Yadav et al. 2023): trim each d_i to its top `density` fraction by magnitude, elect a sign
          per entry by the summed trimmed mass, and average the weighted entries that agree with it (disjoint
          mean); as in peft.utils.merge_utils.ties.
  dare    DARE (Yu et al. 2024): drop each entry of d_i with probability `drop` (seeded), rescale the kept ones
          by 1 / (1 - drop), then sum_i w_i d_i (peft's dare_linear); `dare_ties` follows DARE by TIES' sign
          election and disjoint mean.
ties and dare give a dense delta: folded into the kernels, or written as a plain LoRA of rank `rank` (truncated
SVD). A merge that is the identity (one adapter at weight 1, nothing trimmed or dropped) returns that adapter
unchanged, whatever its variant. Shape letters: jaxtele/models/__init__.py.
"""

import copy

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.errors import JaxteleError
from jaxtele.models.adapters import LoraAdapter
from jaxtele.models.lora import attach, check_name, linears

METHODS = ("linear", "ties", "dare", "dare_ties")


# --- The published definitions, on stacked task tensors [M, ...] (numpy). ---

def trim(t, density: float):
  """Keep the int(density * size) entries of largest magnitude, zero the rest (density >= 1: all)."""
  if density >= 1:
    return t
  k = int(density * t.size)
  keep = np.zeros(t.size, bool)
  keep[np.argsort(-np.abs(t).ravel(), kind="stable")[:k]] = True
  return np.where(keep.reshape(t.shape), t, 0)


def elect_sign(stack_M):
  """+1 / -1 per entry: the sign of the summed mass (ties count as +1, as peft does)."""
  return np.where(stack_M.sum(0) >= 0, 1.0, -1.0)


def disjoint_mean(weighted_M, agree_M):
  """Mean over the tensors whose entry agrees with the elected sign (0 where none does)."""
  return (weighted_M * agree_M).sum(0) / np.maximum(agree_M.sum(0), 1)


def ties(deltas, weights, density: float):
  trimmed_M = np.stack([trim(np.asarray(d), density) for d in deltas])
  agree_M = np.sign(trimmed_M) == elect_sign(trimmed_M)
  w_M = np.asarray(weights, trimmed_M.dtype).reshape((-1,) + (1,) * (trimmed_M.ndim - 1))
  return disjoint_mean(trimmed_M * w_M, agree_M)


def dare_drop(t, drop: float, rng):
  """Each entry dropped with probability `drop`, the kept ones scaled by 1 / (1 - drop)."""
  if drop <= 0:
    return t
  keep = rng.random(t.shape) >= drop
  return np.where(keep, t / (1.0 - drop), 0).astype(t.dtype)


def dare(deltas, weights, drop: float, seed: int = 0, then_ties: bool = False):
  rng = np.random.default_rng(seed)
  dropped = [dare_drop(np.asarray(d), drop, rng) for d in deltas]
  if then_ties:
    return ties(dropped, weights, 1.0)
  return sum(w * d for w, d in zip(weights, dropped, strict=True))


def linear(deltas, weights):
  return sum(w * np.asarray(d) for w, d in zip(weights, deltas, strict=True))


# --- Over a model's adapters. ---

def check_request(model, names, weights, method: str, density: float, drop: float):
  from jaxtele.models.lora import adapter_names

  if method not in METHODS:
    raise JaxteleError(f"--method: unknown merge method {method!r} (choose from {', '.join(METHODS)})")
  if len(names) != len(weights) or not names:
    raise JaxteleError(f"--weights: {len(weights)} weights for {len(names)} adapters")
  if len(set(names)) != len(names):
    raise JaxteleError(f"--merge-adapters: an adapter is named twice ({', '.join(names)})")
  missing = [n for n in names if n not in adapter_names(model)]
  if missing:
    raise JaxteleError(f"adapter {missing[0]!r}: not loaded (loaded: {', '.join(adapter_names(model)) or 'none'})")
  if not 0 < density <= 1:
    raise JaxteleError(f"--density: must be in (0, 1], got {density}")
  if not 0 <= drop < 1:
    raise JaxteleError(f"--drop: must be in [0, 1), got {drop}")


def is_identity(names, weights, method, density, drop) -> bool:
  return len(names) == 1 and weights[0] == 1 and (method == "linear" or (method == "ties" and density >= 1)
                                                   or (method in ("dare", "dare_ties") and drop == 0))


def initial_part(lin):
  """What an adapter of `lin` took over from the base W at init (a PiSSA top-R part), or None."""
  return next((d for d in (a.initial_delta() for a in lin.adapters.values()) if d is not None), None)


def original_kernel(lin):
  """The base W the adapters of `lin` change (a PiSSA residual plus its initial part), fp32."""
  w_IO, initial_IO = lin.base_kernel(jnp.float32), initial_part(lin)
  return w_IO if initial_IO is None else w_IO + initial_IO


def task_vector(lin, adapter):
  return np.asarray(adapter.merged_kernel(lin.base_kernel(jnp.float32)) - original_kernel(lin), np.float32)


def merge_adapters(model, names, weights, method: str = "linear", *, density: float = 1.0, drop: float = 0.0,
                   seed: int = 0, out: str = "merged", rank: int | None = None):
  """Add adapter `out` to `model`: the adapters `names` combined by `method` (see the module docstring).
  ties / dare adapters are plain LoRAs of rank `rank` (default: the sum of the sources' ranks). -> `out`."""
  weights = [float(w) for w in weights]
  check_request(model, names, weights, method, density, drop)
  check_name(out)
  if out in names:
    raise JaxteleError(f"adapter {out!r}: the merged adapter needs a name of its own")
  mods = {p: m for p, m in linears(model).items() if any(n in m.adapters for n in names)}
  if is_identity(names, weights, method, density, drop):
    for lin in mods.values():
      attach(lin, out, copy.deepcopy(lin.adapters[names[0]]))
    return out
  if method == "linear":
    return _linear_adapter(mods, names, weights, out)
  reparametrized = next((a for lin in mods.values() for a in lin.adapters.values() if a.initial_delta() is not None),
                        None)
  if reparametrized is not None:  # its base is a residual: a plain adapter of the delta would sit on the wrong W
    raise JaxteleError(f"--method {method}: {reparametrized.variant} adapters merge by {method} into a model "
                       "(--format hf), not into an adapter")
  deltas = merged_deltas(model, names, weights, method, density=density, drop=drop, seed=seed)
  total = rank or sum(source_ranks(mods, names).values())
  for path, d_IO in deltas.items():
    r = min(total, *d_IO.shape)
    u_IK, s_K, vt_KO = np.linalg.svd(np.asarray(d_IO, np.float64), full_matrices=False)
    root_R = np.sqrt(s_K[:r])
    a_IR, b_RO = np.zeros((d_IO.shape[0], total), np.float32), np.zeros((total, d_IO.shape[1]), np.float32)
    a_IR[:, :r], b_RO[:r] = u_IK[:, :r] * root_R, root_R[:, None] * vt_KO[:r]
    attach(mods[path], out, LoraAdapter(a_IR, b_RO, scale=1.0))
  return out


def source_ranks(mods, names) -> dict:
  """{name: its largest rank over the layers it adapts}."""
  return {n: max(lin.adapters[n].rank for lin in mods.values() if n in lin.adapters) for n in names}


def merged_deltas(model, names, weights, method: str, *, density: float = 1.0, drop: float = 0.0,
                  seed: int = 0) -> dict:
  """{Linear path: the combined delta [I, O] from the original base} (an adapter absent from a layer adds 0)."""
  out = {}
  for i, (path, lin) in enumerate(sorted((p, m) for p, m in linears(model).items()
                                         if any(n in m.adapters for n in names))):
    d_M = [task_vector(lin, lin.adapters[n]) if n in lin.adapters else np.zeros(lin.shape, np.float32)
           for n in names]
    if method == "linear":
      out[path] = linear(d_M, weights)
    elif method == "ties":
      out[path] = ties(d_M, weights, density)
    else:  # one stream per layer: the drop masks do not depend on which other layers exist
      out[path] = dare(d_M, weights, drop, seed=seed * 1_000_003 + i, then_ties=method == "dare_ties")
  return out


def fold_merge(model, names, weights, method: str = "linear", **kw):
  """The merged model: each targeted kernel becomes W + the combined delta; every adapter is dropped."""
  weights = [float(w) for w in weights]
  check_request(model, names, weights, method, kw.get("density", 1.0), kw.get("drop", 0.0))
  deltas = merged_deltas(model, names, weights, method, **kw)
  for path, lin in linears(model).items():
    if path in deltas:
      lin.kernel = nnx.Param((original_kernel(lin) + deltas[path]).astype(jnp.float32))
    elif initial_part(lin) is not None:
      lin.kernel = nnx.Param(original_kernel(lin))
    lin.drop_adapters()
  return model


def _linear_adapter(mods, names, weights, out: str):
  """The exact linear merge as one adapter (see the module docstring); one rank and scale on every layer. Each
  variant combines its own leaves (`linear_merge`)."""
  firsts = [lin.adapters[n] for n in names for lin in mods.values() if n in lin.adapters]
  kinds = {type(a) for a in firsts}
  if len(kinds) > 1:
    raise JaxteleError(f"--method linear: adapters of different variants ({', '.join(sorted(k.variant for k in kinds))}) "
                       "do not make one adapter; merge them into a model (--format hf) or use ties / dare")
  scale, ranks = firsts[0].scale, source_ranks(mods, names)
  for lin in mods.values():
    parts = [(lin.adapters.get(n), w) for n, w in zip(names, weights, strict=True)]
    first = next(a for a, _ in parts if a is not None)
    attach(lin, out, first.linear_merge(parts, [ranks[n] for n in names], lin.shape, scale))
  return out
