"""Sharding rules: the actual specs of parameters and optimizer moments on two meshes, tensor parallelism that
splits whole heads, a loud error for a parameter no rule names, and a report of axes that cannot divide."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxtele import build
from jaxtele.errors import JaxteleError
from jaxtele.optimizer import make_optimizer
from jaxtele.sharding import Shardings, make_mesh, put
from jaxtele.step import init_state


def placed_state(tiny, mesh_shape, *overrides):
  """The tiny recipe's train state placed on a mesh: real arrays, so `.sharding.spec` is what JAX holds."""
  cfg = tiny(*overrides)
  model_cfg = build.model_config(cfg.model)
  graphdef, params, frozen = build.split_model(build.build_model(cfg), cfg)
  tx, _ = make_optimizer(cfg.optimizer, 10)
  state = init_state(params, tx)
  rules = Shardings(make_mesh(mesh_shape), model_cfg.num_heads, model_cfg.num_kv_heads)
  return put(state, rules.tree(state)), put(frozen, rules.tree(frozen)), rules


def specs(tree) -> dict:
  return {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def find(specs_by_path, *parts):
  hits = [s for p, s in specs_by_path.items() if all(part in p for part in parts)]
  assert hits, parts
  return hits


def test_fsdp_mesh_shards_params_and_adam_moments(tiny):
  state, _, _ = placed_state(tiny, {"data": 2, "fsdp": 4, "tensor": 1})
  params, adam = specs(state["params"]), state["opt_state"][1][0]
  # The model dimension (embed = 32, divisible by fsdp = 4) of every matrix is split over fsdp.
  for name, want in (("'q_proj']['kernel'", P("fsdp", None)), ("'o_proj']['kernel'", P(None, "fsdp")),
                     ("'down_proj']['kernel'", P(None, "fsdp")), ("'embedding'", P(None, "fsdp"))):
    assert set(find(params, name)) == {want}, name
    assert set(find(specs(adam.mu), name)) == {want} and set(find(specs(adam.nu), name)) == {want}, name
  assert set(find(params, "'scale'")) == {P(None)}  # norms: replicated
  # Device placement agrees: each of the 4 fsdp shards of a q_proj kernel holds a quarter of its rows.
  q = state["params"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert {s.data.shape for s in q.addressable_shards} == {(8, 32)}


def test_tensor_mesh_splits_whole_heads(tiny):
  state, frozen, rules = placed_state(tiny, {"data": 4, "fsdp": 1, "tensor": 2})
  params, mu = specs(state["params"]), specs(state["opt_state"][1][0].mu)
  for tree in (params, mu):
    assert set(find(tree, "'q_proj']['kernel'")) == {P(None, "tensor")}  # 4 heads of 8 -> 2 heads per device
    assert set(find(tree, "'k_proj']['kernel'")) == {P(None, "tensor")}  # 2 kv heads -> 1 per device
    assert set(find(tree, "'o_proj']['kernel'")) == {P("tensor", None)}
    assert set(find(tree, "'gate_proj']['kernel'")) == {P(None, "tensor")}
    assert set(find(tree, "'down_proj']['kernel'")) == {P("tensor", None)}
    assert set(find(tree, "'embedding'")) == {P("tensor", None)}  # vocab 264 over 2
  q = state["params"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert {s.data.shape for s in q.addressable_shards} == {(32, 16)}  # 16 columns = 2 whole heads of 8
  assert rules.report() == []


def test_lora_leaves_follow_their_kernel(tiny):
  state, frozen, _ = placed_state(tiny, {"data": 1, "fsdp": 4, "tensor": 2}, "--config.train.mode=lora",
                                  "--config.lora.rank=4")
  params = specs(state["params"])
  assert set(find(params, "'q_proj']", "'lora_a'")) == {P("fsdp", None)}  # in = embed -> fsdp
  assert set(find(params, "'q_proj']", "'lora_b'")) == {P(None, "tensor")}  # out = heads -> tensor
  assert set(find(params, "'o_proj']", "'lora_a'")) == {P("tensor", None)}
  assert set(find(params, "'o_proj']", "'lora_b'")) == {P(None, "fsdp")}
  assert set(find(specs(frozen), "'q_proj']['kernel'")) == {P("fsdp", "tensor")}


def test_heads_that_tensor_cannot_divide_are_replicated_and_reported(tiny):
  # 4 query heads and 2 kv heads over tensor = 4: q splits whole heads, k/v cannot and are reported once.
  state, _, rules = placed_state(tiny, {"data": 2, "fsdp": 1, "tensor": 4})
  assert set(find(specs(state["params"]), "'k_proj']['kernel'")) == {P(None, None)}
  assert set(find(specs(state["params"]), "'q_proj']['kernel'")) == {P(None, "tensor")}
  lines = rules.report()
  assert any("tensor=4 does not divide kv_heads (2) of layers/*/self_attn/k_proj/kernel (6 leaves" in l
             for l in lines), lines  # 2 layers x (kernel, Adam mu, Adam nu)
  assert len([l for l in lines if "k_proj/kernel" in l]) == 1  # once, not per layer or per moment


def test_head_dim_is_never_split_even_when_the_width_divides():
  # 3 heads of 8 (width 24) over tensor = 2: 24 divides by 2 but a head would be cut in half.
  rules = Shardings(make_mesh({"data": 4, "fsdp": 1, "tensor": 2}), num_heads=3, num_kv_heads=1)
  assert rules.spec("layers/0/self_attn/q_proj/kernel", (16, 24)) == P(None, None)
  assert "does not divide heads (3)" in rules.report()[0]


def test_a_matrix_no_rule_names_is_an_error():
  rules = Shardings(make_mesh({"data": -1}), num_heads=4, num_kv_heads=2)
  with pytest.raises(JaxteleError, match="sharding: no rule for parameter layers/0/mlp/mystery/kernel of shape"):
    rules.spec("layers/0/mlp/mystery/kernel", (8, 8))
  assert rules.spec("opt/count", ()) == P()
