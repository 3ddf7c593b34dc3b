"""The chunked cross-entropy equals the plain one, value and gradients, without materialising [B, T, V].

Outside reference: a float64 numpy cross-entropy with its closed-form gradients (softmax - onehot).
Through the model, the chunked path must equal the plain path (itself checked against transformers).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtele.loss import chunked_sum_and_count, masked_sum_and_count
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import init_model
from jaxtele.models.lora import add_lora
from jaxtele.step import loss_sums

B, T, D, V = 3, 7, 8, 37
TOL = 1e-5


def data(seed=0):
  r = np.random.default_rng(seed)
  h = r.normal(size=(B, T, D)).astype(np.float32)
  w = r.normal(size=(D, V)).astype(np.float32)
  targets = r.integers(0, V, size=(B, T)).astype(np.int32)
  mask = (r.random((B, T)) < 0.7).astype(np.int32)
  mask[1] = 0  # a row with no trained target
  return h, w, targets, mask


def numpy_reference(h, w, targets, mask):
  h, w = h.astype(np.float64), w.astype(np.float64)
  logits = h @ w
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  m = mask.astype(np.float64)
  dlogits = (np.exp(logits - lse[..., None]) - np.eye(V)[targets]) * m[..., None]
  return np.sum((lse - picked) * m), m.sum(), dlogits @ w.T, np.einsum("btd,btv->dv", h, dlogits)


def assert_close(got, want, what):
  err = np.max(np.abs(np.asarray(got, np.float64) - want)) / max(1.0, np.max(np.abs(want)))
  assert err <= TOL, f"{what}: max scaled error {err:.2e} > {TOL}"


@pytest.mark.parametrize("chunk", [5, 8, 21, 1000])  # 5 and 8 do not divide B*T = 21
def test_chunked_matches_numpy_and_plain(chunk):
  h, w, targets, mask = data()
  s_ref, c_ref, dh_ref, dw_ref = numpy_reference(h, w, targets, mask)
  chunked = jax.jit(lambda h, w: chunked_sum_and_count(h, w, targets, mask, chunk))
  plain = jax.jit(lambda h, w: masked_sum_and_count(jnp.einsum("btd,dv->btv", h, w), targets, mask))
  for name, fn in (("chunked", chunked), ("plain", plain)):
    s, (dh, dw) = jax.value_and_grad(lambda h, w: fn(h, w)[0], argnums=(0, 1))(h, w)
    assert_close(s, s_ref, f"{name} sum")
    assert float(fn(h, w)[1]) == c_ref
    assert_close(dh, dh_ref, f"{name} dh")
    assert_close(dw, dw_ref, f"{name} dW")
    assert np.all(np.asarray(dh)[1] == 0), "a row with no trained target gets no gradient"


def test_no_trained_target_at_all():
  h, w, targets, _ = data(1)
  s, c = chunked_sum_and_count(h, w, targets, np.zeros((B, T), np.int32), 4)
  g = jax.grad(lambda h: chunked_sum_and_count(h, w, targets, np.zeros((B, T), np.int32), 4)[0])(h)
  assert float(s) == 0.0 and float(c) == 0.0 and not np.any(np.asarray(g))


def model_batch(seed=0, T=9):
  r = np.random.default_rng(seed)
  seg = np.array([[1] * 4 + [2] * 5, [1] * 6 + [0] * 3], np.int32)
  pos = np.array([list(range(4)) + list(range(5)), list(range(6)) + [0] * 3], np.int32)
  mask = (seg != 0).astype(np.int32)
  mask[0, 3] = 0  # across the document boundary
  return {"tokens": r.integers(0, 97, (2, T)).astype(np.int32), "targets": r.integers(0, 97, (2, T)).astype(np.int32),
          "segment_ids": seg, "positions": pos, "loss_mask": mask}


@pytest.mark.parametrize("head", ["tied", "untied", "lora_head"])
def test_chunked_through_the_model(head):
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, tie_word_embeddings=head == "tied")
  model = init_model(cfg, seed=3)
  trainable = nnx.Param
  if head == "lora_head":
    add_lora(model, rank=4, alpha=8.0, targets="lm_head,q_proj")
    for _, m in nnx.iter_modules(model):  # nonzero B, so the adapter changes the head and gets gradients
      if getattr(m, "lora_b", None) is not None:
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(1), m.lora_b.shape))
    trainable = nnx.LoRAParam
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  batch = model_batch()
  results = {}
  for loss, chunk in (("plain", 0), ("chunked", 4)):  # 4 does not divide 18 tokens
    fn = jax.jit(jax.value_and_grad(lambda p: loss_sums(graphdef, p, frozen, batch, loss=loss, chunk=chunk),
                                    has_aux=True))
    results[loss] = fn(params)
  ((s_p, c_p), g_p), ((s_c, c_c), g_c) = results["plain"], results["chunked"]
  assert float(c_p) == float(c_c) == batch["loss_mask"].sum()
  assert_close(s_c, float(s_p), "loss sum")
  leaves_p, leaves_c = jax.tree.leaves(g_p), jax.tree.leaves(g_c)
  assert len(leaves_p) == len(leaves_c) > 0
  for gp, gc in zip(leaves_p, leaves_c, strict=True):
    assert np.any(np.asarray(gp)), "every compared gradient is nonzero"
    assert_close(gc, np.asarray(gp, np.float64), "param grad")
