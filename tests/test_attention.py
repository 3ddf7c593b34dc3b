"""Every attention implementation that runs on CPU equals an independent dense reference on packed GQA rows.

The reference is a float64 numpy computation (forward) and a hand-written dense jnp attention (gradients):
neither shares code with jaxtele. Outputs at padding positions are unspecified but must be finite, so values
are compared on document positions and the cotangent is zero at padding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtele.errors import JaxteleError
from jaxtele.models.attention import attention, resolve_attention, xla_attention
from jaxtele.models.kernels.cudnn import cudnn_attention
from jaxtele.models.kernels.pallas import pallas_attention

# Row 0: three documents then padding; row 1: two documents filling the row.
SEGMENTS = np.array([[1] * 5 + [2] * 4 + [3] * 4 + [0] * 3, [1] * 9 + [2] * 7], np.int32)
B, T = SEGMENTS.shape
N, H = 4, 16
WINDOW = 3
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

IMPLS = {
    "xla": xla_attention,
    "pallas_triton": functools.partial(pallas_attention, kernel="triton", interpret=True),
    "pallas_splash": functools.partial(pallas_attention, kernel="splash", interpret=True),
    # The exact cuDNN call, sent through JAX's XLA path: checks the mask/window arguments on CPU.
    "cudnn_args": functools.partial(cudnn_attention, implementation="xla"),
}


def allowed(seg_BT, window):
  i = np.arange(seg_BT.shape[1])
  ok_TS = i[:, None] >= i[None, :]
  if window:
    ok_TS &= i[:, None] - i[None, :] < window
  return ok_TS[None] & (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, None, :] != 0)


def numpy_reference(q, k, v, seg_BT, window):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  ok = allowed(seg_BT, window)[:, None]
  s = np.where(ok, s, -np.inf)
  s = s - np.max(s, axis=-1, keepdims=True, where=ok, initial=-1e300)
  p = np.where(ok, np.exp(s), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnts,bsnh->btnh", p, v)


def jnp_reference(q, k, v, seg_BT, window):
  """Dense fp32 attention with -inf masking; padding queries get zeros (their value is never compared)."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
  s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  ok = jnp.asarray(allowed(seg_BT, window))[:, None] | jnp.asarray(seg_BT == 0)[:, None, :, None]
  p = jax.nn.softmax(jnp.where(ok, s, -jnp.inf), axis=-1)
  return jnp.einsum("bnts,bsnh->btnh", p, v)


def inputs(K, dtype, seed=0):
  r = np.random.default_rng(seed)
  q = r.normal(size=(B, T, N, H)).astype(np.float32)
  k = r.normal(size=(B, T, K, H)).astype(np.float32)
  v = r.normal(size=(B, T, K, H)).astype(np.float32)
  ct = r.normal(size=(B, T, N, H)).astype(np.float32) * (SEGMENTS != 0)[:, :, None, None]
  cast = lambda x: jnp.asarray(x, dtype)
  return cast(q), cast(k), cast(v), jnp.asarray(ct, jnp.float32)


def vjp(fn, q, k, v, ct):
  out, pull = jax.vjp(fn, q, k, v)
  return out, pull(ct.astype(out.dtype))


def assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))
  assert err <= tol, f"{what}: max scaled error {err:.2e} > {tol}"


# bf16 on GQA (K=2) only, to keep the interpreted kernels' runtime down; fp32 covers K=2 and MQA (K=1).
CASES = [(impl, K, window, dtype) for impl in IMPLS for window in (None, WINDOW)
         for K, dtype in ((2, "float32"), (1, "float32"), (2, "bfloat16"))]


@pytest.mark.parametrize("impl,K,window,dtype", CASES)
def test_matches_dense_reference(impl, K, window, dtype):
  if impl == "pallas_triton" and window:
    pytest.skip("the Triton kernel has no sliding window (resolve_attention refuses it)")
  q, k, v, ct = inputs(K, dtype)
  fn = jax.jit(lambda q, k, v: IMPLS[impl](q, k, v, jnp.asarray(SEGMENTS), sliding_window=window))
  out, grads = vjp(fn, q, k, v, ct)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert np.all(np.isfinite(np.asarray(out, np.float32))), "padding rows must stay finite"
  docs = SEGMENTS != 0
  tol = TOL[dtype]
  # Forward against float64 numpy on the same (possibly bf16-rounded) inputs.
  assert_close(np.asarray(out, np.float32)[docs], numpy_reference(q, k, v, SEGMENTS, window)[docs], tol, "out")
  _, ref_grads = vjp(lambda q, k, v: jnp_reference(q, k, v, SEGMENTS, window), q, k, v, ct)
  for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
    assert g.dtype == q.dtype
    assert_close(np.asarray(g, np.float32), np.asarray(rg, np.float32), tol, f"d{name}")


def test_dispatch_runs_pallas_on_cpu_interpreted():
  q, k, v, _ = inputs(2, "float32", seed=1)
  seg = jnp.asarray(SEGMENTS)
  docs = SEGMENTS != 0
  for window in (None, WINDOW):
    out = attention(q, k, v, seg, sliding_window=window, impl="pallas")
    assert_close(np.asarray(out)[docs], numpy_reference(q, k, v, SEGMENTS, window)[docs], 1e-5, "pallas")


def test_cudnn_on_cpu_is_refused_in_one_line():
  q, k, v, _ = inputs(2, "bfloat16")
  with pytest.raises(JaxteleError) as e:
    attention(q, k, v, jnp.asarray(SEGMENTS), impl="cudnn")
  assert "\n" not in str(e.value) and "cudnn" in str(e.value) and "cpu" in str(e.value)


def test_resolve_attention():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert resolve_attention("auto", bf16, 64, None) == "xla"  # this CPU
  assert resolve_attention("auto", bf16, 64, None, backend="gpu") == "cudnn"
  assert resolve_attention("auto", bf16, 64, 4096, backend="gpu") == "cudnn"
  # fp32 never gets a fused GPU kernel (Triton's fp32 blocks overflow shared memory at head dim 128).
  assert resolve_attention("auto", f32, 64, None, backend="gpu") == "xla"
  assert resolve_attention("auto", f32, 128, None, backend="gpu") == "xla"
  assert resolve_attention("auto", f32, 64, 4096, backend="gpu") == "xla"
  assert resolve_attention("auto", bf16, 60, None, backend="gpu") == "xla"  # cuDNN needs a multiple of 8
  assert resolve_attention("auto", bf16, 256, None, backend="gpu") == "xla"  # > 128 before Hopper
  assert resolve_attention("auto", bf16, 64, 4096, backend="gpu") == "cudnn"
  assert resolve_attention("auto", f32, 64, 4096, backend="tpu") == "pallas"
  assert resolve_attention("pallas", f32, 64, 8, backend="cpu") == "pallas"
  for bad in [("flash", bf16, 64, None, "gpu"), ("pallas", bf16, 64, 8, "gpu"), ("cudnn", f32, 64, None, "gpu"),
              ("cudnn", bf16, 64, None, "tpu")]:
    with pytest.raises(JaxteleError):
      resolve_attention(*bad[:4], backend=bad[4])


def test_auto_is_decided_when_the_model_is_built_never_in_a_trace(monkeypatch):
  """A Decoder built outside `build` (no config layer) settles `auto` at construction; its trace asks nothing."""
  from jaxtele.models import attention as attention_module
  from jaxtele.models.config import ModelConfig
  from jaxtele.models.decoder import init_model

  cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, attention="auto")
  model = init_model(cfg)
  assert model.config.attention == "xla"  # this CPU; the GPU/TPU choices are test_resolve_attention's
  calls = []
  real = attention_module.resolve_attention
  monkeypatch.setattr(attention_module, "resolve_attention", lambda impl, *a, **k: calls.append(impl) or real(impl, *a, **k))
  model(jnp.zeros((1, 4), jnp.int32))
  assert "auto" not in calls
  with pytest.raises(JaxteleError, match="impl='auto' reached a trace"):
    attention(*inputs(2, "float32")[:3], jnp.asarray(SEGMENTS), impl="auto")
  with pytest.raises(JaxteleError, match="^remat: unknown policy 'sometimes'"):
    init_model(cfg.replace(remat="sometimes"))
