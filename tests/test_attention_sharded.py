"""Fused attention on a mesh: each device runs the kernel on its own rows and heads, never the global batch.

Interpreted Pallas kernels on 4-8 emulated CPU devices, data x fsdp x tensor meshes. Checks: the compiled
forward + backward holds no all-gather (an unsharded kernel all-gathers q/k/v to run the global batch), and
outputs and gradients equal a float64 numpy reference (forward) and the unsharded run (gradients).
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxtele.errors import JaxteleError
from jaxtele.models.attention import attention
from jaxtele.models.kernels import cudnn
from jaxtele.models.kernels.sharded import sharded, split
from jaxtele.sharding import make_mesh

SEGMENTS = np.array([[1] * 5 + [2] * 8 + [0] * 3, [1] * 16, [1] * 7 + [2] * 9, [1] * 10 + [0] * 6], np.int32)
B, T = SEGMENTS.shape
N, H = 4, 16
TOL = 1e-5


def numpy_reference(q, k, v, seg):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  k, v = np.repeat(k, N // k.shape[2], axis=2), np.repeat(v, N // v.shape[2], axis=2)
  i = np.arange(T)
  ok = (i[:, None] >= i[None, :])[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  s = np.where(ok[:, None], np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H), -np.inf)
  p = np.exp(s - np.max(s, -1, keepdims=True, initial=-1e300, where=ok[:, None]))
  p = np.where(ok[:, None], p, 0.0)
  return np.einsum("bnts,bsnh->btnh", p / np.maximum(p.sum(-1, keepdims=True), 1e-300), v)


def inputs(K, seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (r.normal(size=(B, T, n, H)).astype(np.float32) for n in (N, K, K))
  ct = r.normal(size=(B, T, N, H)).astype(np.float32) * (SEGMENTS != 0)[:, :, None, None]
  return q, k, v, ct


def out_and_grads(impl):
  """jit of (attention output, d(sum(out * ct))/d(q, k, v)): forward and backward in one compiled program."""
  def f(q, k, v, seg, ct):
    out, pull = jax.vjp(lambda q, k, v: attention(q, k, v, seg, impl=impl), q, k, v)
    return out, pull(ct)

  return jax.jit(f)


def put(mesh, x, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))


# (mesh, K, how the kv projection is sharded): rows over data x fsdp with heads and kv heads split over tensor
# (8 devices); kv heads that tensor cannot split, replicated as the sharding rules leave k_proj (4 devices).
MESHES = [({"data": 2, "fsdp": 2, "tensor": 2}, 2, "tensor"), ({"data": 2, "fsdp": 1, "tensor": 2}, 1, None)]


@pytest.mark.parametrize("shape,K,kv_axis", MESHES)
def test_pallas_stays_sharded(shape, K, kv_axis):
  mesh = make_mesh(shape, jax.devices()[:shape["data"] * shape["fsdp"] * shape["tensor"]])
  q, k, v, ct = inputs(K)
  rows = tuple(a for a in ("data", "fsdp") if shape[a] > 1)
  heads = "tensor" if shape["tensor"] > 1 else None
  args = (put(mesh, q, P(rows, None, heads)), put(mesh, k, P(rows, None, kv_axis)),
          put(mesh, v, P(rows, None, kv_axis)), put(mesh, SEGMENTS, P(rows)), put(mesh, ct, P(rows, None, heads)))
  fn = out_and_grads("pallas")
  with jax.set_mesh(mesh):
    compiled = fn.lower(*args).compile()
    out, grads = compiled(*args)
  assert compiled.as_text().count("all-gather") == 0, "q/k/v were all-gathered around the kernel"
  docs = SEGMENTS != 0
  want = numpy_reference(q, k, v, SEGMENTS)
  assert np.max(np.abs(np.asarray(out, np.float64)[docs] - want[docs])) <= TOL
  _, ref_grads = fn(q, k, v, SEGMENTS, ct)  # no mesh context: the kernel on the whole batch on one device
  for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
    err = np.max(np.abs(np.asarray(g) - np.asarray(rg))) / max(1.0, np.max(np.abs(np.asarray(rg))))
    assert err <= TOL, f"d{name}: {err:.2e}"


def test_without_shard_map_the_kernel_is_all_gathered():
  """The failure the wrapper prevents, so the count above can fail: the same kernel without `shard_map`."""
  from jaxtele.models.kernels.pallas import pallas_attention

  mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
  q, k, v, _ = inputs(2)
  rows = P("data")
  f = jax.jit(lambda q, k, v, s: pallas_attention(q, k, v, s, interpret=True))
  hlo = f.lower(*(put(mesh, x, rows) for x in (q, k, v, SEGMENTS))).compile().as_text()
  assert hlo.count("all-gather") > 0


def test_split_rule():
  assert split({"data": 2, "fsdp": 4, "tensor": 1}, 8, 9, 3) == (("data", "fsdp"), None, False)
  assert split({"data": 1, "fsdp": 1, "tensor": 2}, 8, 32, 8) == ((), "tensor", False)
  assert split({"data": 4, "fsdp": 1, "tensor": 2}, 8, 12, 2) == (("data",), "tensor", False)
  # SmolLM2-135M: 9 heads, 3 kv heads. tensor=3 splits both; tensor=2 divides neither: replicated over it.
  assert split({"data": 1, "fsdp": 1, "tensor": 3}, 8, 9, 3) == ((), "tensor", False)
  assert split({"data": 2, "fsdp": 1, "tensor": 2}, 8, 9, 3) == (("data",), None, False)
  # Qwen2.5-1.5B: 12 heads, 2 kv heads on tensor=4: kv heads repeated to 12, then split.
  assert split({"data": 1, "fsdp": 1, "tensor": 4}, 8, 12, 2) == ((), "tensor", True)
  with pytest.raises(JaxteleError, match="batch 6 is not divisible"):
    split({"data": 4, "fsdp": 1, "tensor": 1}, 6, 4, 2)


def test_cudnn_call_under_tensor_mesh_with_unsplittable_kv_heads():
  """The exact cuDNN call (through JAX's XLA path: cuDNN cannot run on CPU) under the same per-shard rule,
  K=1 on tensor=2: kv heads repeated, no all-gather, values as the reference."""
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  q, k, v, _ = inputs(1, seed=2)
  kernel = functools.partial(cudnn.cudnn_attention, implementation="xla")
  f = jax.jit(lambda q, k, v, s: sharded(kernel, q, k, v, s))
  args = (put(mesh, q, P("data", None, "tensor")), put(mesh, k, P("data")), put(mesh, v, P("data")),
          put(mesh, SEGMENTS, P("data")))
  with jax.set_mesh(mesh):
    compiled = f.lower(*args).compile()
    out = compiled(*args)
  assert compiled.as_text().count("all-gather") == 0
  docs = SEGMENTS != 0
  assert np.max(np.abs(np.asarray(out, np.float64)[docs] - numpy_reference(q, k, v, SEGMENTS)[docs])) <= TOL
