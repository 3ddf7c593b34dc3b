"""The batch contract (jaxtele/batch.py) against what its producers make and its consumers count, by hand."""

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxtele import batch
from jaxtele.data.packing import lm_example, pack
from jaxtele.loss import masked_sum_and_count

# The contract as DESIGN.md states it, written out here so a renamed or dropped key fails this test.
CONTRACT = {"tokens", "targets", "segment_ids", "positions", "loss_mask"}


def test_keys_are_the_design_contract():
  assert set(batch.KEYS) == CONTRACT and len(batch.KEYS) == len(CONTRACT)
  assert set(batch.EXAMPLE_KEYS) == {"tokens", "targets", "loss_mask"}
  assert batch.DTYPE == np.int32


def test_packed_rows_carry_exactly_the_contract():
  # Two documents of 3 and 2 ids in one row of 6: pairs (1,2),(2,3) then (7,8), then padding.
  examples = [lm_example(np.array([1, 2, 3])), lm_example(np.array([7, 8]))]
  (row,) = list(pack(grain.MapDataset.source(examples).to_iter_dataset(), 6, "first_fit", num_packing_bins=1))
  assert set(row) == CONTRACT
  assert all(v.dtype == np.int32 and v.shape == (6,) for v in row.values())
  np.testing.assert_array_equal(row["tokens"], [1, 2, 7, 0, 0, 0])
  np.testing.assert_array_equal(row["targets"], [2, 3, 8, 0, 0, 0])
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 0, 0, 0])


def test_empty_batch_counts_nothing():
  b = batch.empty(2, 5)
  assert set(b) == CONTRACT and all(v.shape == (2, 5) and v.dtype == np.int32 for v in b.values())
  assert not any(v.any() for v in b.values())  # every slot padding
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
  total, count = masked_sum_and_count(logits, jnp.asarray(b["targets"]), jnp.asarray(b["loss_mask"]))
  assert float(total) == 0.0 and float(count) == 0.0


def test_abstract_batch_is_shapes_only():
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  b = batch.abstract(4, 8, sharding)
  assert set(b) == CONTRACT
  for v in b.values():
    assert isinstance(v, jax.ShapeDtypeStruct) and v.shape == (4, 8) and v.dtype == jnp.int32
    assert v.sharding == sharding
  # It lowers a function over the contract without any data.
  lowered = jax.jit(lambda x: x["loss_mask"].sum() + x["segment_ids"].sum()).lower(batch.abstract(4, 8))
  assert "4x8" in lowered.as_text()


def test_whole_rows_by_hand():
  ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
  for make in (np.asarray, jnp.asarray):
    b = batch.whole_rows(make(ids))
    assert set(b) == CONTRACT
    np.testing.assert_array_equal(b["tokens"], [[5, 6, 7], [9, 10, 11]])
    np.testing.assert_array_equal(b["targets"], [[6, 7, 8], [10, 11, 12]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(b["segment_ids"], np.ones((2, 3)))
    np.testing.assert_array_equal(b["loss_mask"], np.ones((2, 3)))
    assert all(np.asarray(v).dtype == np.int32 for v in b.values())
