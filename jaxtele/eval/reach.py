"""How much of the full-weight gradient a LoRA adapter can follow at its current A and B, and the kernels a run's
checkpoints hold (base and effective, through `Linear.base_kernel` / `Linear.effective_kernel`, so an NF4 base
reads like a float one).

Layout: kernels are [in, out] (HF's weight transposed), y = x @ W; the adapter adds s * A @ B with A [I, R],
B [R, O]. One gradient step on A and B moves W, to first order, by s * (dA @ B + A @ dB), with dA = s G B^T
and dB = s A^T G for G = dL/dW [I, O]. The reachable directions are the matrices P_A M + M P_B - P_A M P_B, P_A
the projector onto span(A) in the input space (acting on the left of an [I, O] matrix) and P_B the projector
onto span(B^T) in the output space (acting on the right). The share of G's energy in that subspace is

  rho = (||P_A G||^2 + ||G P_B||^2 - ||P_A G P_B||^2) / ||G||^2,

the same number as (||P_B G||^2 + ||G P_A||^2 - ||P_B G P_A||^2) / ||G||^2 in PyTorch's [out, in] layout,
where W' = W + B A. B = 0 (the first step) leaves only P_A G: A's gradient s G B^T is zero. A and B are the factors
the adapter class names (`factors()`): for DoRA only those are counted (the magnitude adds one scaling per output
column). Legend: I in, O out, R rank.
"""

import numpy as np


def orthonormal_basis(m_XR: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
  """[X, rank] orthonormal columns spanning m's columns (an empty basis for a zero matrix)."""
  u, s, _ = np.linalg.svd(np.asarray(m_XR, np.float64), full_matrices=False)
  return u[:, s > rtol * max(s.max(initial=0.0), 1e-300)]


def reachable_fraction(g_IO: np.ndarray, a_IR: np.ndarray, b_RO: np.ndarray) -> float:
  """rho of the module docstring (NaN for a zero gradient)."""
  g = np.asarray(g_IO, np.float64)
  qa_IK, qb_OK = orthonormal_basis(a_IR), orthonormal_basis(np.asarray(b_RO).T)
  left, right = qa_IK.T @ g, g @ qb_OK  # ||P_A G|| = ||Qa^T G||, ||G P_B|| = ||G Qb||
  both = qa_IK.T @ g @ qb_OK
  total = np.sum(g * g)
  if total == 0:
    return float("nan")
  return float((np.sum(left ** 2) + np.sum(right ** 2) - np.sum(both ** 2)) / total)


def layer_linears(model) -> dict:
  """{path tuple: Linear} of the decoder layers."""
  from flax import nnx

  from jaxtele.models.layers import Linear

  return {tuple(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and p and p[0] == "layers"}


def active_name(lin):
  """The adapter a layer's update is read from: its active one, else its only unmerged one (None: none)."""
  live = [n for n, a in lin.adapters.items() if not a.merged]
  if lin.active is not None and lin.active in lin.adapters:
    return lin.active
  return live[0] if len(live) == 1 else None


def active_adapter(lin):
  name = active_name(lin)
  return None if name is None else lin.adapters[name]


def kernels(model) -> dict:
  """{path: (W0_IO, W_IO)} in fp32 numpy: the base a layer started from and its effective kernel now. With an
  adapter W = the adapter's merged kernel over `base_kernel` (a dequantized NF4 base included), and a PiSSA
  residual gets its initial part back in W0; without one both are the current kernel."""
  import jax
  import jax.numpy as jnp

  out = {}
  for path, lin in layer_linears(model).items():
    w_IO = lin.base_kernel(jnp.float32)
    name = active_name(lin)
    if name is None:
      w = np.asarray(jax.device_get(w_IO), np.float32)
      out[path] = (w, w)
      continue
    initial_IO = lin.adapters[name].initial_delta()
    w0_IO = w_IO if initial_IO is None else w_IO + initial_IO
    out[path] = (np.asarray(jax.device_get(w0_IO), np.float32),
                 np.asarray(jax.device_get(lin.effective_kernel(jnp.float32, name)), np.float32))
  return out


def factors(model) -> dict:
  """{path: (A_IR, B_RO)} of each adapted layer's active adapter."""
  import jax

  out = {}
  for path, lin in layer_linears(model).items():
    adapter = active_adapter(lin)
    if adapter is not None:
      out[path] = tuple(np.asarray(jax.device_get(x), np.float64) for x in adapter.factors())
  return out


def plain_model(graphdef, params, frozen, kernels: dict):
  """The model with the layers in `kernels` ({path: W_IO}) replaced by plain float weights: no adapter, no NF4."""
  import jax.numpy as jnp
  from flax import nnx

  model = nnx.merge(graphdef, params, frozen)
  for path, lin in layer_linears(model).items():
    if path in kernels:
      lin.make_plain(jnp.asarray(kernels[path], jnp.float32))
  return model


def kernel_gradients(graphdef, params, frozen, batch, tuned: dict) -> dict:
  """{path: G_IO = dL/dW} at the effective kernels `tuned` ({path: W_IO}), for the mean NLL of `batch`: the
  model rebuilt with those kernels as plain (adapter-free, float) weights, so the gradient is the full-weight
  one whatever the run trained."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxtele.step import loss_sums

  g_def, weights, rest = nnx.split(plain_model(graphdef, params, frozen, tuned), nnx.Param, ...)

  def mean_nll(w):
    s, c = loss_sums(g_def, w, rest, batch)
    return s / jnp.maximum(c, 1.0)

  grads = nnx.to_pure_dict(jax.jit(jax.grad(mean_nll))(weights))  # one compile, not one per op
  out = {}
  for path in tuned:
    node = grads
    for key in path:
      node = node[key]
    out[path] = np.asarray(jax.device_get(node["kernel"]), np.float64)
  return out
