"""Token examples -> fixed-length packed rows under the batch contract.

An example is pre-shifted (`tokens` = ids[:-1], `targets` = ids[1:]) before packing, so every target
lives in its own document's segment: no trained target can cross into the next document, and the
packers never have to know about boundaries. Documents longer than a row are split into row-sized
pieces (each a new segment whose positions restart), never truncated or dropped.
"""

import grain
import grain.experimental as ge
import numpy as np

from jaxtele.batch import DTYPE, EXAMPLE_KEYS

PACKINGS = ("first_fit", "best_fit", "concat")


def lm_example(ids: np.ndarray, weights: np.ndarray | None = None) -> dict:
  """ids [n] (and per-token training weights [n]) -> next-token pairs of length n - 1."""
  ids = np.asarray(ids, DTYPE)
  mask = np.ones_like(ids) if weights is None else np.asarray(weights, DTYPE)
  return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def split_example(ex: dict, max_len: int) -> list[dict]:
  n = len(ex["tokens"])
  return [{k: ex[k][i:i + max_len] for k in EXAMPLE_KEYS} for i in range(0, n, max_len)]


class SplitLong(ge.FlatMapTransform):
  """Row-sized pieces of a long example; examples with no pair (a 1-token document) vanish."""

  max_fan_out = 1 << 20

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, ex):
    return split_example(ex, self.seq_len)


def to_batch_contract(row: dict) -> dict:
  segment_ids = row["tokens_segment_ids"].astype(DTYPE)
  return {
      "tokens": row["tokens"].astype(DTYPE),
      "targets": row["targets"].astype(DTYPE),
      "segment_ids": segment_ids,
      "positions": row["tokens_positions"].astype(DTYPE),
      "loss_mask": (row["loss_mask"] * (segment_ids != 0)).astype(DTYPE),
  }


def pack(examples: grain.IterDataset, seq_len: int, method: str = "first_fit", num_packing_bins: int = 64,
         seed: int = 0) -> grain.IterDataset:
  """Examples -> rows of length `seq_len` under the batch contract (jaxtele/batch.py)."""
  pieces = ge.FlatMapIterDataset(examples, SplitLong(seq_len))
  lengths = {k: seq_len for k in EXAMPLE_KEYS}
  if method == "concat":
    rows = ge.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
  elif method in ("first_fit", "best_fit"):
    cls = ge.FirstFitPackIterDataset if method == "first_fit" else ge.BestFitPackIterDataset
    rows = cls(pieces, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed, shuffle_bins=False)
  else:
    raise ValueError(f"unknown packing {method!r} (choose from {', '.join(PACKINGS)})")
  return rows.map(to_batch_contract)
