"""Perplexity of packed evaluation sets, sharded over the mesh: the trainer's periodic evaluation, and what
`python -m jaxtele.eval` builds on for a run's own sets. Keys follow metrics.py (`eval/<set>/<stat>`)."""

import itertools

import jax
import numpy as np

from jaxtele import batch as batch_contract
from jaxtele.metrics import eval_key
from jaxtele.sharding import global_batch


def evaluate(eval_step, params, frozen, eval_sets, mesh, max_batches, local_shape, byte_count=None,
             progress=None) -> dict:
  """Perplexity per set. With several processes every process runs `max_batches` steps (validation
  requires it to be set), feeding empty batches once its shard is exhausted, so collectives line up.

  `byte_count(batch) -> int` (e.g. `scored_bytes` with the tokenizer) adds bits per byte;
  `progress(name, batches_done)` is called after each batch."""
  out = {}
  for name, ds in eval_sets.items():
    total = count = nbytes = 0.0
    it = iter(ds)
    for i in itertools.count():
      if max_batches and i >= max_batches:
        break
      batch = next(it, None)
      if batch is None:
        if jax.process_count() == 1:
          break
        batch = batch_contract.empty(*local_shape)  # segment 0: nothing counted
      s, c = eval_step(params, frozen, global_batch(batch, mesh))
      total, count = total + float(s), count + float(c)
      if byte_count is not None:
        nbytes += byte_count(batch)
      if progress is not None:
        progress(name, i + 1)
    loss = total / max(count, 1.0)
    out.update({eval_key(name, "loss"): loss, eval_key(name, "ppl"): float(np.exp(loss)),
                eval_key(name, "tokens"): count})
    if byte_count is not None:
      out[eval_key(name, "bytes")] = nbytes
      out[eval_key(name, "bpb")] = total / np.log(2) / max(nbytes, 1.0)
  return out


def scored_bytes(tokenizer):
  """batch -> UTF-8 bytes of the text its scored targets spell (special tokens such as EOS count 0).

  Each run of scored targets within one segment is decoded as a whole, so multi-token characters count
  once; a document split across rows may miscount the one character cut at the split."""
  def count(batch) -> int:
    targets, mask, segs = (np.asarray(batch[k]) for k in ("targets", "loss_mask", "segment_ids"))
    total = 0
    for row in range(targets.shape[0]):
      scored = mask[row] > 0
      if not scored.any():
        continue
      # Runs break where scoring stops or the segment changes.
      key = np.where(scored, segs[row], -1)
      edges = np.flatnonzero(np.diff(key)) + 1
      for run_t, run_s in zip(np.split(targets[row], edges), np.split(scored, edges), strict=True):
        if run_s[0]:
          total += len(tokenizer.decode(run_t.tolist(), skip_special_tokens=True).encode("utf-8"))
    return total

  return count
