"""The chunked loss stays sharded: under pure data parallelism (data=4) the compiled train step holds as many
all-gathers as with the plain loss (none; 18 when the loss flattened the batch into its tiles), and the loss
and gradients equal the plain loss's (itself checked against a float64 numpy cross-entropy in test_loss.py;
1e-5)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtele.accelerator import mesh_context
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import init_model
from jaxtele.sharding import Shardings, batch_sharding, make_mesh
from jaxtele.step import init_state, make_train_step

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


def test_chunked_train_step_stays_sharded(tiny_model):
  """data=4: the compiled chunked step holds as many all-gathers as the plain one (0), and its loss and SGD
  update (lr 1: the gradients themselves) equal the plain step's."""
  graphdef, params, frozen = tiny_model
  mesh = make_mesh({"data": 4, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
  tx = optax.sgd(1.0)
  rules = Shardings(mesh, 4, 2)
  state = init_state(params, tx)
  state_sh, frozen_sh = rules.tree(state), rules.tree(frozen)
  b = batch()
  counts, results = {}, {}
  with mesh_context(mesh):
    for loss in ("plain", "chunked"):  # chunk 10: 5 positions per row per tile, the 12 positions padded to 15
      step = jax.jit(make_train_step(graphdef, tx, 1, loss, chunk=10),
                     in_shardings=(state_sh, frozen_sh, batch_sharding(mesh)))
      compiled = step.lower(state, frozen, b).compile()
      counts[loss] = compiled.as_text().count("all-gather")
      results[loss] = jax.device_get(compiled(state, frozen, b))
  assert counts["chunked"] == counts["plain"] == 0, counts
  (new_p, m_p), (new_c, m_c) = results["plain"], results["chunked"]
  assert float(m_c["trained_tokens"]) == float(m_p["trained_tokens"]) == b["loss_mask"].sum()
  assert abs(float(m_c["loss"]) - float(m_p["loss"])) <= TOL * max(1.0, abs(float(m_p["loss"])))
  for p0, gp, gc in zip(jax.tree.leaves(params), jax.tree.leaves(new_p["params"]), jax.tree.leaves(new_c["params"]),
                        strict=True):
    grad_p, grad_c = np.asarray(p0, np.float64) - gp, np.asarray(p0, np.float64) - gc
    assert np.any(grad_p != 0)
    assert np.max(np.abs(grad_p - grad_c)) <= TOL * max(1.0, np.max(np.abs(grad_p)))
