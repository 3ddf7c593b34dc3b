"""The packed batch both benchmarks train on: documents of random lengths packed into rows, positions
restarting per document, the last slots of a row padding. Deterministic for a seed, so the jaxtele and the
PyTorch process build the same one."""

import numpy as np

from jaxtele import batch as batch_contract


def packed_batch(batch: int, seq_len: int, vocab: int, mean_doc: int = 512, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  out = batch_contract.empty(batch, seq_len)
  for b in range(batch):
    t, seg = 0, 1
    while t < seq_len - 8:  # leave a little padding at the end of most rows, as packing does
      n = int(min(max(rng.geometric(1 / mean_doc), 8), seq_len - t))
      ids = rng.integers(0, vocab, n + 1)
      out["tokens"][b, t:t + n], out["targets"][b, t:t + n] = ids[:-1], ids[1:]
      out["segment_ids"][b, t:t + n], out["positions"][b, t:t + n] = seg, np.arange(n)
      out["loss_mask"][b, t:t + n] = 1
      t, seg = t + n, seg + 1
  return out
