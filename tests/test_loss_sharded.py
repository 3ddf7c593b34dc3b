"""The chunked loss stays sharded: under pure data parallelism (data=4) the compiled train step holds as many
all-gathers as with the plain loss (none), and the loss and gradients equal the plain loss on one device
(the plain loss is itself checked against a float64 numpy cross-entropy in test_loss.py; 1e-5)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtele.accelerator import mesh_context
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import init_model
from jaxtele.sharding import Shardings, batch_sharding, make_mesh
from jaxtele.step import init_state, loss_sums, make_train_step

TOL = 1e-5


def batch(B=8, T=12, V=97, seed=0):
  r = np.random.default_rng(seed)
  seg = np.ones((B, T), np.int32)
  seg[::2, T // 2:] = 2
  seg[1::4, -3:] = 0
  pos = np.concatenate([np.arange(T)[None]] * B).astype(np.int32)
  pos[::2, T // 2:] -= T // 2
  mask = (seg != 0).astype(np.int32)
  return {"tokens": r.integers(0, V, (B, T)).astype(np.int32), "targets": r.integers(0, V, (B, T)).astype(np.int32),
          "segment_ids": seg, "positions": pos, "loss_mask": mask}


@pytest.fixture(scope="module")
def tiny_model():
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=8, tie_word_embeddings=False)
  graphdef, params, frozen = nnx.split(init_model(cfg, seed=0), nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def test_chunked_train_step_has_no_extra_all_gathers(tiny_model):
  graphdef, params, frozen = tiny_model
  mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
  tx = optax.sgd(0.1)
  rules = Shardings(mesh, 4, 2)
  state = init_state(params, tx)
  state_sh, frozen_sh = rules.tree(state), rules.tree(frozen)
  b = batch()
  counts = {}
  with mesh_context(mesh):
    for loss in ("plain", "chunked"):
      step = jax.jit(make_train_step(graphdef, tx, 1, loss, chunk=6),  # 3 positions per row per tile
                     in_shardings=(state_sh, frozen_sh, batch_sharding(mesh)))
      counts[loss] = step.lower(state, frozen, b).compile().as_text().count("all-gather")
  assert counts["chunked"] == counts["plain"] == 0, counts


def test_chunked_on_a_mesh_equals_plain_on_one_device(tiny_model):
  graphdef, params, frozen = tiny_model
  b = batch(seed=1)
  grad = lambda loss, chunk: jax.jit(jax.value_and_grad(
      lambda p: loss_sums(graphdef, p, frozen, b, loss=loss, chunk=chunk), has_aux=True))
  (s_ref, c_ref), g_ref = grad("plain", 0)(params)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
  with mesh_context(mesh):
    (s, c), g = grad("chunked", 10)(params)  # 5 positions per row: 12 is padded to 15
  assert float(c) == float(c_ref) == b["loss_mask"].sum()
  assert abs(float(s) - float(s_ref)) <= TOL * max(1.0, abs(float(s_ref)))
  for gr, gc in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g), strict=True):
    gr, gc = np.asarray(gr, np.float64), np.asarray(gc, np.float64)
    assert np.max(np.abs(gr - gc)) <= TOL * max(1.0, np.max(np.abs(gr)))
