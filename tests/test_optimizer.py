"""Optimizer and precision: schedules against their closed forms, weight decay only on matrices,
remat and bf16 compute in the train step, LoRA with extra trainable modules."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import init_model
from jaxtele.models.lora import add_lora, trainable_filter
from jaxtele.optimizer import make_optimizer, schedule
from jaxtele.step import init_state, make_train_step

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, qkv_bias=True)


def opt_cfg(**kw):
  base = dict(lr=1e-3, schedule="cosine", warmup_ratio=0.1, final_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
              eps=1e-8, clip=1.0)
  return ml_collections.ConfigDict(base | kw)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup", "wsd"])
def test_schedules(kind):
  lr = schedule(opt_cfg(schedule=kind), 100)
  # Warmup over 10 updates: update c (optax count) runs at peak * (c + 1) / 10, the peak at the 10th.
  assert math.isclose(float(lr(0)), 1e-4, rel_tol=1e-6) and math.isclose(float(lr(4)), 5e-4, rel_tol=1e-6)
  assert math.isclose(float(lr(9)), 1e-3, rel_tol=1e-6) and math.isclose(float(lr(10)), 1e-3, rel_tol=1e-6)
  end = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3, "constant_with_warmup": 1e-3, "wsd": 1e-4}[kind]
  assert math.isclose(float(lr(100)), end, rel_tol=1e-5)
  if kind == "cosine":  # halfway through the decay: final + (peak - final) / 2
    assert math.isclose(float(lr(55)), 1e-4 + 0.5 * 9e-4, rel_tol=1e-5)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_holds_the_peak_then_decays_over_the_last_fraction(shape):
  """100 updates, warmup 10, decay over the last 20 (from count 80): hand values of each shape."""
  lr = schedule(opt_cfg(schedule="wsd", decay_fraction=0.2, decay_shape=shape), 100)
  peak, final = 1e-3, 1e-4
  for c in (10, 40, 79, 80):
    assert math.isclose(float(lr(c)), peak, rel_tol=1e-6), c
  for c in (85, 90, 99):
    t = (c - 80) / 20
    frac = {"linear": 1 - t, "cosine": 0.5 * (1 + math.cos(math.pi * t)), "sqrt": 1 - math.sqrt(t)}[shape]
    assert math.isclose(float(lr(c)), final + (peak - final) * frac, rel_tol=1e-5), (shape, c)
  assert math.isclose(float(lr(100)), final, rel_tol=1e-5)


def test_wsd_without_room_for_its_decay_is_refused():
  from jaxtele.errors import JaxteleError

  with pytest.raises(JaxteleError, match="optimizer.decay_fraction"):
    schedule(opt_cfg(schedule="wsd", warmup_ratio=0.5, decay_fraction=0.6), 100)


def test_one_warmup_update_runs_at_the_peak_not_at_zero():
  """warmup_ratio x steps = 1: the first (and only warmup) update runs at the peak lr and moves the weights."""
  lr = schedule(opt_cfg(warmup_ratio=0.1), 10)
  assert math.isclose(float(lr(0)), 1e-3, rel_tol=1e-6)
  before, after, _, _ = one_step(TINY, ocfg=opt_cfg(warmup_ratio=0.1, weight_decay=0.0))
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
  assert min(moved) > 1e-4  # Adam's first step moves every leaf by ~lr (sign of its gradient)


def batch_of(B=4, T=8, trained=True, seed=0):
  rng = np.random.default_rng(seed)
  b = {"tokens": rng.integers(0, 64, (B, T)), "targets": rng.integers(0, 64, (B, T)),
       "segment_ids": np.ones((B, T)), "positions": np.tile(np.arange(T), (B, 1)),
       "loss_mask": np.full((B, T), int(trained))}
  return {k: jnp.asarray(v, jnp.int32) for k, v in b.items()}


def one_step(cfg: ModelConfig, mode="full", extra="", trained=True, ocfg=None, lora=False):
  model = init_model(cfg)
  if lora:
    add_lora(model, 4, 8.0)
  graphdef, params, frozen = nnx.split(model, trainable_filter(mode, extra), ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  tx, _ = make_optimizer(ocfg or opt_cfg(warmup_ratio=0.0), 10)
  state = init_state(params, tx)
  new, metrics = jax.jit(make_train_step(graphdef, tx, 1))(state, frozen, batch_of(trained=trained))
  return params, new["params"], frozen, metrics


def test_weight_decay_shrinks_matrices_only():
  """No gradient (nothing trained): AdamW's update is pure decay, which must skip norms and biases."""
  before, after, _, _ = one_step(TINY, trained=False)
  flat_b, flat_a = nnx.traversals.flatten_mapping(before), nnx.traversals.flatten_mapping(after)
  for path, x in flat_b.items():
    y = flat_a[path]
    if x.ndim >= 2:
      np.testing.assert_allclose(y, x * (1 - 1e-3 * 0.1), rtol=1e-6)
    else:
      assert path[-1] in ("scale", "bias") and np.array_equal(x, y)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_every_remat_policy_trains_like_no_remat(policy):
  _, p_plain, _, m_plain = one_step(TINY)
  _, p_remat, _, m_remat = one_step(TINY.replace(remat=policy))
  np.testing.assert_allclose(m_remat["loss"], m_plain["loss"], atol=1e-5)
  np.testing.assert_allclose(m_remat["grad_norm"], m_plain["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_remat), strict=True):  # Adam's first step is ~lr * sign(g)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_host_offload_remat_is_refused_on_cpu():
  """Refused by validation, before the model is traced (the model package itself asks no device)."""
  import os

  from jaxtele.build import model_config
  from jaxtele.config import load_config, validate
  from jaxtele.errors import JaxteleError

  recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_test.py")
  cfg = load_config(recipe, ["--config.model.remat=offload_dots"])
  with pytest.raises(JaxteleError, match="config: model.remat: offload_dots needs a GPU or TPU"):
    validate(cfg, model_config(cfg.model), 1)


def test_bf16_compute_keeps_fp32_master_weights():
  _, p_plain, _, m_plain = one_step(TINY)
  _, p_bf16, _, m_bf16 = one_step(TINY.replace(dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p_bf16))  # fp32 master weights
  assert abs(float(m_bf16["loss"]) - float(m_plain["loss"])) < 0.05


def test_lora_with_extra_trainable_norms():
  before, after, frozen, metrics = one_step(TINY, mode="lora", extra=r"norm", lora=True)
  names = {p[-1] for p in nnx.traversals.flatten_mapping(after)}
  assert names == {"lora_a", "lora_b", "scale"}
  assert not any(p[-1] in ("kernel", "embedding", "bias") for p in nnx.traversals.flatten_mapping(after))
  assert {"grad_norm/lora_a", "grad_norm/lora_b", "grad_norm/base"} <= set(metrics)
  flat_b, flat_a = nnx.traversals.flatten_mapping(before), nnx.traversals.flatten_mapping(after)
  assert any(not np.array_equal(flat_b[p], flat_a[p]) for p in flat_b if p[-1] == "scale")


def lora_step(variant="lora", plus_ratio=0.0, dropout=0.0, seed=None):
  model = init_model(TINY)
  add_lora(model, 4, 8.0, variant=variant, dropout=dropout)
  graphdef, params, frozen = nnx.split(model, trainable_filter("lora"), ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  tx, _ = make_optimizer(opt_cfg(warmup_ratio=0.0, clip=0.0), 10, plus_ratio=plus_ratio)
  state = init_state(params, tx)
  new, _ = jax.jit(make_train_step(graphdef, tx, 1))(state, frozen, batch_of())
  return params, new["params"], frozen


def test_lora_plus_scales_only_b_updates():
  """Adam's update is lr * m/(sqrt(v)+eps) + lr * wd * p: with lr x ratio on B it is exactly ratio x plain's."""
  before, plain, _ = lora_step(plus_ratio=0.0)
  _, plus, _ = lora_step(plus_ratio=16.0)
  fb, fp, fq = (nnx.traversals.flatten_mapping(t) for t in (before, plain, plus))
  for path, x in fb.items():
    d_plain, d_plus = fp[path] - x, fq[path] - x
    want = 16.0 * d_plain if path[-1] == "lora_b" else d_plain
    np.testing.assert_allclose(d_plus, want, rtol=1e-4, atol=1e-9)
  assert any(np.abs(fp[p] - fb[p]).max() > 0 for p in fb if p[-1] == "lora_b")


def test_dora_step_moves_only_adapter_leaves():
  before, after, frozen = lora_step(variant="dora")
  names = {p[-1] for p in nnx.traversals.flatten_mapping(after)}
  assert names == {"lora_a", "lora_b", "lora_magnitude"}
  fb, fa = nnx.traversals.flatten_mapping(before), nnx.traversals.flatten_mapping(after)
  for leaf in names:
    assert any(not np.array_equal(fb[p], fa[p]) for p in fb if p[-1] == leaf)
  # The frozen base is not in the optimised tree at all, so the step cannot have moved it.
  assert not any(p[-1] in ("kernel", "embedding", "bias", "scale") for p in fa)


def test_adapter_dropout_only_with_a_key():
  from jaxtele.models.adapters import adapter_inputs
  from jaxtele.models.lora import linears

  model = init_model(TINY)
  add_lora(model, 4, 8.0, dropout=0.5)
  for lin in linears(model).values():
    b = lin.adapters["default"].lora_b
    b.set_value(np.full(b.shape, 0.1, np.float32))
  tokens = batch_of()["tokens"]
  eval_a, eval_b = np.asarray(model(tokens)), np.asarray(model(tokens))
  assert np.array_equal(eval_a, eval_b)  # deterministic without a key
  with adapter_inputs(dropout_key=jax.random.key(0)):
    drop0 = np.asarray(model(tokens))
  with adapter_inputs(dropout_key=jax.random.key(1)):
    drop1 = np.asarray(model(tokens))
  assert np.abs(drop0 - eval_a).max() > 1e-4 and np.abs(drop0 - drop1).max() > 1e-4


def test_lora_plus_ratio_must_not_be_negative():
  from jaxtele.errors import JaxteleError

  with pytest.raises(JaxteleError, match="lora.plus_ratio"):
    make_optimizer(opt_cfg(), 10, plus_ratio=-1.0)


def test_config_refuses_a_wsd_run_without_room_for_warmup_and_decay(tiny):
  from jaxtele.config import validate
  from jaxtele.errors import JaxteleError

  cfg = tiny("--config.optimizer.schedule=wsd", "--config.optimizer.warmup_ratio=0.5",
             "--config.optimizer.decay_fraction=0.6")
  with pytest.raises(JaxteleError, match=r"config: optimizer.decay_fraction: 0.6 \+ optimizer.warmup_ratio \(0.5\)"):
    validate(cfg, ModelConfig(max_position_embeddings=256), 8)
