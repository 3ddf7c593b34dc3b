"""QLoRA: the NF4 code book equals the published one, quantize -> dequantize stays within the NF4 bound
(against an independent numpy quantizer over the published table), and a QLoRA run lowers the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtele.models import quantize
from jaxtele.models.lora import add_lora, linears, quantize_base

# NF4's 16 values as published with QLoRA (Dettmers et al. 2023, Appendix E) and hard-coded in bitsandbytes
# (csrc/kernels.cu, dDequantizeNF4 / nf4_dequantization_lut).
PUBLISHED_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def test_code_book_is_the_published_nf4():
  np.testing.assert_allclose(quantize.CODE_BOOK, PUBLISHED_NF4, atol=1e-6, rtol=0)


def reference_dequantize(w_IO, block=64):
  """Independent: nearest published level per weight, blocks of 64 along the input axis."""
  I, O = w_IO.shape
  P = -(-I // block) * block
  w = np.pad(w_IO, ((0, P - I), (0, 0))).reshape(P // block, block, O).astype(np.float64)
  absmax = np.abs(w).max(axis=1, keepdims=True)
  idx = np.abs(w[..., None] / absmax[..., None] - PUBLISHED_NF4).argmin(-1)
  return (PUBLISHED_NF4[idx] * absmax).reshape(P, O)[:I], np.broadcast_to(absmax, w.shape).reshape(P, O)[:I]


@pytest.mark.parametrize("shape", [(128, 48), (96, 64), (576, 192)])
def test_quantize_dequantize_within_the_nf4_bound(shape):
  w = np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)
  got = np.asarray(quantize.NF4Weight(w).dequantize(jnp.float32))
  want, absmax = reference_dequantize(w)
  # Same levels as the reference (1e-6 of absmax: fp32 products); the error is at most half the widest
  # gap between neighbouring levels, (1 - 0.6962) / 2, times the block's absmax.
  assert np.abs(got - want).max() <= 1e-6 * absmax.max()
  half_gap = np.diff(PUBLISHED_NF4).max() / 2
  assert np.all(np.abs(got - w) <= half_gap * absmax + 1e-7)
  # On normal weights the mean error is far below the bound (QLoRA's point): ~1/10 of absmax.
  assert np.abs(got - w).mean() < 0.1 * np.abs(w).max()
  dq = np.asarray(quantize.NF4Weight(w, double_quant=True).dequantize(jnp.float32))
  # Double quantization: int8 absmaxes (256 per fp32 scale) add at most half an int8 step per block.
  assert np.all(np.abs(dq - w) <= (half_gap + 1 / 127) * absmax + 1e-6)
  assert np.abs(dq - got).max() > 0


def test_qlora_bytes_and_forward_use_the_dequantized_base():
  from jaxtele.models.config import ModelConfig
  from jaxtele.models.decoder import init_model

  cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=32, param_dtype="bfloat16", dtype="float32")
  model = init_model(cfg)
  n_kernel = sum(int(np.prod(m.shape)) for m in linears(model).values())
  bf16_bytes = 2 * n_kernel
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)))
  quantize_base(model)
  nf4 = sum(m.quant.nbytes() for m in linears(model).values())
  assert nf4 == n_kernel // 2 + 4 * n_kernel // 64  # 4 bits + one fp32 absmax per 64
  quantize_base(model := init_model(cfg), double_quant=True)
  dq = sum(m.quant.nbytes() for m in linears(model).values())
  assert dq < nf4 < bf16_bytes / 3.5
  add_lora(model, 4, 8.0)
  for lin in linears(model).values():  # the base is read through the one accessor
    assert lin.kernel is None and lin.base_kernel(jnp.float32).shape == lin.shape
  assert np.isfinite(np.asarray(model(tokens))).all()


def test_qlora_run_lowers_the_loss(tiny):
  """build_model with lora.quantize_base=nf4 (+ double quantization) trained through make_train_step."""
  from jaxtele import build
  from jaxtele.optimizer import make_optimizer
  from jaxtele.step import init_state, make_train_step

  cfg = tiny("--config.train.mode=lora", "--config.lora.rank=4")
  with cfg.unlocked():
    cfg.lora.quantize_base = "nf4"
    cfg.lora.double_quant = True
  model = build.build_model(cfg)
  assert all(m.quant is not None for p, m in linears(model).items())
  graphdef, params, frozen = build.split_model(model, cfg)
  # NF4 storage is never cast to base_dtype; only float Params are.
  kinds = {str(p[-1]): x.dtype for p, x in nnx.traversals.flatten_mapping(frozen).items()}
  assert kinds["codes"] == jnp.uint8 and kinds["absmax_q"] == jnp.int8 and kinds["absmax_scale"] == jnp.float32
  tx, _ = make_optimizer(cfg.optimizer, 20)
  state = init_state(params, tx)
  step = jax.jit(make_train_step(graphdef, tx, 1))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 264, (8, 33))  # one fixed batch: the loss on it must fall
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 32)),
           "positions": np.tile(np.arange(32), (8, 1)), "loss_mask": np.ones((8, 32))}
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
  losses = []
  for _ in range(15):
    state, m = step(state, frozen, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
