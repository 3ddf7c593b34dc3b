"""Packing invariants on property-based inputs, for every packing method."""

import grain
import numpy as np
from hypothesis import given, settings, strategies as st

from jaxtele.data.packing import PACKINGS, lm_example, pack

# Token value = 1000 * (document + 1) + index within the document: ownership and order are readable.


def run_pack(lengths, seq_len, method, masks=None):
  docs = [1000 * (d + 1) + np.arange(n, dtype=np.int32) for d, n in enumerate(lengths)]
  examples = [lm_example(ids, None if masks is None else masks[d]) for d, ids in enumerate(docs)]
  rows = list(pack(grain.MapDataset.source(examples).to_iter_dataset(), seq_len, method, num_packing_bins=3))
  return docs, rows


def segments(row):
  for s in np.unique(row["segment_ids"]):
    if s:
      yield np.flatnonzero(row["segment_ids"] == s)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), seq_len=st.integers(2, 16),
       method=st.sampled_from(PACKINGS))
def test_packing_invariants(lengths, seq_len, method):
  docs, rows = run_pack(lengths, seq_len, method)
  seen = {d: [] for d in range(len(docs))}
  seen_targets = {d: [] for d in range(len(docs))}
  for row in rows:
    assert all(row[k].shape == (seq_len,) and row[k].dtype == np.int32 for k in row)
    pad = row["segment_ids"] == 0
    assert not row["loss_mask"][pad].any()
    for idx in segments(row):
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment is contiguous"
      assert np.array_equal(row["positions"][idx], np.arange(len(idx))), "positions restart per segment"
      owner = set(row["tokens"][idx] // 1000)
      assert len(owner) == 1, "one document per segment"
      d = owner.pop() - 1
      trained = idx[row["loss_mask"][idx] == 1]
      # A trained target is the next token of the same document: it never crosses a boundary.
      assert np.array_equal(row["targets"][trained], row["tokens"][trained] + 1)
      assert np.array_equal(np.diff(row["tokens"][idx]), np.ones(len(idx) - 1)), "in order within a segment"
      seen[d].append(row["tokens"][idx].tolist())
      seen_targets[d].append(row["targets"][idx].tolist())
  for d, ids in enumerate(docs):
    # Every input token appears exactly once; re-joining a split document's pieces (bins may emit them
    # in any row order) loses nothing.
    assert sum(sorted(seen[d]), []) == ids[:-1].tolist()
    assert sum(sorted(seen_targets[d]), []) == ids[1:].tolist()


def test_long_document_is_split_not_truncated():
  docs, rows = run_pack([50], 8, "first_fit")
  assert len(rows) == 7 and sum(int((r["segment_ids"] != 0).sum()) for r in rows) == 49


def test_prompt_weights_survive_packing():
  masks = [np.array([0, 0, 0, 1, 1], np.int32), np.array([0, 1, 1], np.int32)]
  _, rows = run_pack([5, 3], 8, "first_fit", masks)
  trained = sorted(t for r in rows for t in r["targets"][r["loss_mask"] == 1].tolist())
  assert trained == [1003, 1004, 2001, 2002]
