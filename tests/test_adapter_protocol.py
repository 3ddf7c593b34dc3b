"""The adapter protocol: a new variant declared in this file alone (no other module edited) trains through the
real trainer, shards on an 8-device mesh, logs and reports its own gradient-norm group, takes LoRA+'s rate where
it says so, and merges and unmerges.

The variant: LoRA with a learned per-output gain, delta = s * x A B diag(g), g [O] starting at 1. Truth is
hand-derived: sharding from the kernel rules (q_proj's out axis is heads -> tensor, o_proj's is embed -> fsdp),
the gain's gradient at B = 0 is exactly zero, parameter counts from the tiny model's shapes, the merged kernel
computed here in numpy.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtele.models import leaves
from jaxtele.models.adapters import LoraAdapter, register

GROUP = "train/grad_norm/toy_gain"
# The tiny recipe's linears, [in, out]: hidden 32, 4 heads x 8, 2 kv heads, mlp 64; 2 layers.
SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32), "gate_proj": (32, 64),
          "up_proj": (32, 64), "down_proj": (64, 32)}


@register
class GainLora(LoraAdapter):
  """LoRA times a learned gain per output feature; the gain trains at LoRA+'s rate, as B does."""

  variant = "toy_gain"
  LEAVES = LoraAdapter.LEAVES + (leaves.Leaf("toy_gain", ("out",), plus=True),)
  loads_peft = False

  def __init__(self, a_IR, b_RO, gain_O, *, scale: float, dropout: float = 0.0):
    super().__init__(a_IR, b_RO, scale=scale, dropout=dropout)
    self.toy_gain = nnx.LoRAParam(jnp.asarray(gain_O))

  @classmethod
  def initialise(cls, lin, *, rank, scale, key, dropout=0.0, where=""):
    plain = LoraAdapter.initialise(lin, rank=rank, scale=scale, key=key)
    return cls(plain.lora_a[...], plain.lora_b[...], jnp.ones(lin.shape[1], jnp.float32), scale=scale,
               dropout=dropout)

  def delta_kernel(self):
    return super().delta_kernel() * self.toy_gain[...].astype(jnp.float32)

  def __call__(self, x_BTI, lin, base_BTO, key=None):
    return super().__call__(x_BTI, lin, base_BTO, key) * self.toy_gain[...].astype(x_BTI.dtype)

  def peft_tensors(self) -> dict:  # the gain folds into B exactly: s x A (B diag g)
    return {"lora_A.weight": self.lora_a[...].T, "lora_B.weight": (self.lora_b[...] * self.toy_gain[...]).T}


def leaves_named(tree, module, leaf):
  return [x for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if jax.tree_util.keystr(p).endswith(f"['{module}']['adapters']['default']['{leaf}']")]


def test_toy_variant_trains_shards_logs_and_is_diagnosed(tiny, tmp_path, capsys):
  from jaxtele import run_report as report
  from jaxtele.metrics import grad_keys
  from jaxtele.eval import diagnose
  from jaxtele.train import run

  cfg = tiny("--config.train.mode=lora", "--config.lora.variant=toy_gain", "--config.lora.rank=2",
             "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.train.log_every=1")
  res = run(cfg)
  assert res["losses"][-1] < res["losses"][0], res["losses"]
  params, adam = res["state"]["params"], res["state"]["opt_state"][1][0]
  gains = leaves_named(params, "q_proj", "toy_gain")
  assert len(gains) == 2 and all(np.abs(np.asarray(g) - 1).max() > 0 for g in gains)  # the gain trained
  # Its declared axes ("out",) follow the kernel: q_proj out = heads -> tensor, o_proj out = embed -> fsdp;
  # Adam's moments follow the parameter.
  for tree in (params, adam.mu, adam.nu):
    assert {x.sharding.spec for x in leaves_named(tree, "q_proj", "toy_gain")} == {P("tensor")}
    assert {x.sharding.spec for x in leaves_named(tree, "o_proj", "toy_gain")} == {P("fsdp")}
  assert {s.data.shape for s in gains[0].addressable_shards} == {(16,)}
  # metrics.jsonl: the group every step; at step 1 B is still 0, so the gain's gradient is exactly 0.
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  logged = [r for r in rows if GROUP in r]
  assert [r["step"] for r in logged] == list(range(1, 7))
  assert logged[0][GROUP] == 0.0 and all(r[GROUP] > 0 for r in logged[1:])
  assert logged[0]["train/grad_norm/lora_b"] > 0
  # diagnose: the group, its parameter count (sum of out features over 7 modules x 2 layers), the logged values.
  assert diagnose.main([str(tmp_path / "run")]) == 0
  assert GROUP in capsys.readouterr().out
  result = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
  assert result["grad_groups"]["toy_gain"] == 2 * sum(o for _, o in SHAPES.values()) == 512
  assert result["grad_norms"][GROUP]["values"] == [r[GROUP] for r in logged]
  assert result["grad_norms"][GROUP]["parameters"] == 512
  assert all(r["max_rank"] == 2 and 1 <= r["effective_rank"] <= 2 for r in result["rows"])  # rank-2 update
  # the report: one gradient-norm panel per logged group, this one included
  page = report.build_report([str(tmp_path / "run")], str(tmp_path / "report"))
  assert "grad_norms.png" in open(page).read()
  assert GROUP in grad_keys(report.Run(str(tmp_path / "run"), "run").rows)


def tiny_model(seed=0):
  from jaxtele.models.config import ModelConfig
  from jaxtele.models.decoder import init_model
  from jaxtele.models.lora import add_lora, linears

  model = init_model(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=8, qkv_bias=True), seed=seed)
  add_lora(model, rank=2, alpha=4.0, targets="q_proj,down_proj", variant="toy_gain")
  rng = np.random.default_rng(seed)  # B and the gain off their init, so the adapter matters
  for lin in linears(model).values():
    for a in lin.adapters.values():
      a.lora_b.set_value(rng.normal(0, 0.1, a.lora_b.shape).astype(np.float32))
      a.toy_gain.set_value(rng.uniform(0.5, 1.5, a.toy_gain.shape).astype(np.float32))
  return model


def test_toy_merge_is_the_hand_computed_kernel_and_unmerge_restores_the_base():
  from jaxtele.models.lora import linears, merge_lora, unmerge_lora

  model = tiny_model()
  tokens = np.random.default_rng(1).integers(0, 64, (2, 12))
  adapted = np.asarray(model(tokens))
  before = {p: np.asarray(m.kernel[...]) for p, m in linears(model).items()}
  want = {}
  for p, m in linears(model).items():
    if "default" in m.adapters:
      a = m.adapters["default"]
      ab = np.asarray(a.lora_a[...], np.float64) @ np.asarray(a.lora_b[...], np.float64)
      want[p] = before[p] + a.scale * ab * np.asarray(a.toy_gain[...], np.float64)
  assert len(want) == 4
  merge_lora(model, keep=True)
  for p, w in want.items():
    np.testing.assert_allclose(np.asarray(linears(model)[p].kernel[...]), w, rtol=0, atol=1e-6)
  assert np.abs(np.asarray(model(tokens)) - adapted).max() < 1e-5  # merged: the same function
  unmerge_lora(model)
  for p, m in linears(model).items():
    assert np.array_equal(np.asarray(m.kernel[...]), before[p])  # bit for bit: restored, not recomputed
  assert np.array_equal(np.asarray(model(tokens)), adapted)


def test_toy_leaves_take_their_declared_optimizer_group_and_count_as_adapters():
  from jaxtele.models.lora import trainable_filter, trainable_table
  from jaxtele.optimizer import lora_plus_labels

  model = tiny_model()
  _, trainable, frozen = nnx.split(model, trainable_filter("lora"), ...)
  params = nnx.to_pure_dict(trainable)
  labels = {jax.tree_util.keystr(p).split("'")[-2]: x
            for p, x in jax.tree_util.tree_leaves_with_path(lora_plus_labels(params))}
  assert labels == {"lora_a": "rest", "lora_b": "b", "toy_gain": "b"}
  # adapters: q_proj (32 x 32) and down_proj (64 x 32), rank 2, 2 layers: A + B + gain
  n = 2 * ((32 * 2 + 2 * 32 + 32) + (64 * 2 + 2 * 32 + 32))
  table = trainable_table(params, nnx.to_pure_dict(frozen))
  assert table[1].split()[:3] == ["adapters", f"{n:,}", "0"]
