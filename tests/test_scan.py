"""`model.scan_layers`: the scanned stack equals the unrolled loop (losses, gradients) on llama and
Gemma 2/3's per-layer windows and RoPE bases, with LoRA, DoRA, NF4 bases and mixed adapters; the parameter tree
and exports are unchanged; Gemma 3 scanned still matches `transformers`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtele.models import scan
from jaxtele.models.adapters import LoraAdapter, adapter_inputs
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import init_model
from jaxtele.models.lora import add_lora, attach, linears, quantize_base
from jaxtele.loss import masked_sum_and_count

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8)
SLIDE, FULL = "sliding_attention", "full_attention"
FAMILIES = {
    "llama": ModelConfig(num_layers=3, **TINY),
    # Window 3 < the documents' lengths, soft-capping, sandwich norms: layers alternate, so groups of 2.
    "gemma2": ModelConfig(model_type="gemma2", num_layers=4, sliding_window=3, layer_types=(SLIDE, FULL) * 2,
                          sandwich_norms=True, norm_offset=1.0, embed_scale=True, hidden_act="gelu_pytorch_tanh",
                          query_pre_attn_scalar=12, attn_softcap=2.0, final_softcap=3.0, **TINY),
    # A local RoPE base on sliding layers; 5 layers = 2 groups of (slide, full) + 1 unrolled after.
    "gemma3": ModelConfig(model_type="gemma3_text", num_layers=5, sliding_window=3,
                          layer_types=(SLIDE, FULL) * 2 + (SLIDE,), rope_local_theta=50.0, rope_theta=5e4,
                          qk_norm=True, sandwich_norms=True, norm_offset=1.0, **TINY),
}
PLANS = {"llama": (1, 3), "gemma2": (2, 2), "gemma3": (2, 2)}


def packed_batch():
  """Two rows of three documents each and trailing padding (segments, restarting positions)."""
  rng = np.random.default_rng(0)
  lengths = [(5, 7, 2), (3, 9, 3)]
  b = {k: np.zeros((2, 16), np.int32) for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
  for r, row in enumerate(lengths):
    t = 0
    for s, n in enumerate(row):
      b["tokens"][r, t:t + n], b["targets"][r, t:t + n] = rng.integers(0, 64, (2, n))
      b["segment_ids"][r, t:t + n], b["positions"][r, t:t + n], b["loss_mask"][r, t:t + n] = s + 1, np.arange(n), 1
      t += n
  return {k: jnp.asarray(v) for k, v in b.items()}


def loss_and_grads(model, scan_layers: bool, filt=nnx.Param, dropout_key=None, **inputs):
  """(loss, grads, jaxpr text) of the masked mean NLL with the model's stack scanned or not."""
  model.config = model.config.replace(scan_layers=scan_layers)
  graphdef, params, frozen = nnx.split(model, filt, ...)
  batch = packed_batch()

  def loss(p, f):  # the frozen part is an argument, as in the train step
    with adapter_inputs(dropout_key=dropout_key, **inputs):
      logits = nnx.merge(graphdef, p, f)(batch["tokens"], batch["positions"], batch["segment_ids"])
    s, c = masked_sum_and_count(logits, batch["targets"], batch["loss_mask"])
    return s / c

  fn = jax.value_and_grad(loss)
  value, grads = jax.jit(fn)(params, frozen)
  return value, grads, str(jax.make_jaxpr(fn)(params, frozen))


def assert_same(a, b, tol=1e-5):
  (la, ga, _), (lb, gb, _) = a, b
  np.testing.assert_allclose(float(la), float(lb), rtol=tol, atol=tol)
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves_with_path(gb)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


def randomise_adapters(model, seed=1):
  """B starts at zero, which would hide A's gradient: give every adapter leaf random values."""
  key = jax.random.key(seed)
  for i, lin in enumerate(linears(model).values()):
    for adapter in lin.adapters.values():
      adapter.lora_b.set_value(0.1 * jax.random.normal(jax.random.fold_in(key, i), adapter.lora_b.shape))


def test_layer_period_groups_repeating_layers_and_falls_back_when_none_repeat():
  for name, cfg in FAMILIES.items():
    assert scan.scan_plan(init_model(cfg).layers) == PLANS[name], name
  gemma3 = FAMILIES["gemma3"].replace(num_layers=7, layer_types=(SLIDE, SLIDE, FULL) * 2 + (SLIDE,))
  assert scan.scan_plan(init_model(gemma3).layers) == (3, 2)
  model = init_model(FAMILIES["llama"])
  lin = model.layers[1].mlp.up_proj  # one adapted layer breaks the pattern: the stack runs unrolled
  attach(lin, "default", LoraAdapter(jnp.zeros((32, 2)), jnp.zeros((2, 48)), scale=1.0))
  assert scan.scan_plan(model.layers)[1] == 1


@pytest.mark.parametrize("name", ["gemma3"])  # llama: the LoRA test; gemma2 (windows, soft-caps): the DoRA test
def test_scanned_loss_and_grads_equal_the_loop(name):
  cfg = FAMILIES[name].replace(remat="dots_saveable")
  model = init_model(cfg, seed=0)
  loop, scanned = loss_and_grads(model, False), loss_and_grads(model, True)
  groups = PLANS[name][1]
  assert "scan[" not in loop[2] and f"length={groups}" in scanned[2]
  assert ("remat" in scanned[2]) == (cfg.remat != "none")  # the policy still applies inside the scan
  assert_same(loop, scanned)


def test_lora_with_dropout_and_remat_draws_the_same_masks_scanned():
  """Dropout keys count adapter calls in trace order: the count crosses the scan and each remat as a value."""
  model = init_model(FAMILIES["llama"].replace(remat="full"))
  add_lora(model, 4, 8.0, dropout=0.3)
  randomise_adapters(model)
  key = jax.random.key(7)
  # Base and adapters both differentiated (remat over a frozen base fails under jax.grad, scanned or not).
  loop, scanned = (loss_and_grads(model, s, nnx.Param, dropout_key=key) for s in (False, True))
  assert "length=3" in scanned[2] and "remat" in scanned[2]
  assert_same(loop, scanned)
  assert "random_bits" in loop[2] and "random_bits" in scanned[2]  # the masks are really drawn, in both


def test_dora_on_nf4_base_with_two_adapters_in_a_mixed_batch():
  model = init_model(FAMILIES["gemma2"])
  quantize_base(model)
  add_lora(model, 4, 8.0, variant="dora", name="a")
  add_lora(model, 2, 4.0, targets="q_proj,v_proj", name="b", seed=3)
  randomise_adapters(model)
  mixed = dict(adapter_ids_B=jnp.asarray([1, -1]), names=("a", "b"))  # row 0: adapter b; row 1: the bare base
  loop, scanned = (loss_and_grads(model, s, nnx.LoRAParam, **mixed) for s in (False, True))
  assert "length=2" in scanned[2]
  assert_same(loop, scanned)


def test_tree_and_hf_export_unchanged(tmp_path, make_hf_model, hf_logits, assert_bit_exact_export):
  """Gemma 3 with 4 layers (2 scanned groups of sliding + full, local and global RoPE) loaded with scanning on:
  the same per-layer tree, a bit-exact export, and packed logits that still match `transformers`."""
  from jaxtele.convert import load_pretrained

  ref = make_hf_model("gemma3", num_hidden_layers=4, layer_types=[SLIDE, FULL] * 2)
  ref.save_pretrained(tmp_path / "hf")
  plain = load_pretrained(str(tmp_path / "hf")).model
  ours = load_pretrained(str(tmp_path / "hf"), scan_layers=True).model
  assert ours.config.scan_layers and scan.scan_plan(ours.layers) == (2, 2)
  paths = lambda m: [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(m))]
  assert paths(ours) == paths(plain) and any("layers']][3]" in p or "layers'][3]" in p for p in paths(ours))
  assert_bit_exact_export(ours, str(tmp_path / "hf"), str(tmp_path / "out"))
  tokens = np.random.default_rng(0).integers(0, 97, size=(2, 20))  # longer than the window of 8
  diff = np.abs(np.asarray(ours(tokens)) - hf_logits(ref, tokens)).max()
  assert diff <= 1e-4, diff


def test_config_key_reaches_the_model_and_not_the_checkpoint_identity():
  from jaxtele import build
  from jaxtele.checkpoint import run_meta
  from jaxtele.config import default_config

  cfg = default_config()
  cfg.model.scan_layers = True
  model_cfg = build.model_config(cfg.model)
  assert model_cfg.scan_layers is True
  assert "scan_layers" not in run_meta(cfg, model_cfg, {}, 0)["model"]
