"""Log-likelihood of chosen tokens of many short sequences (answers, options), batched with right padding.

Legend: B batch, T padded length, V vocab.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.loss import token_nll
from jaxtele.models.decoder import Decoder, check_token_ids


@nnx.jit
def _token_nll(model: Decoder, tokens_BT, targets_BT, segment_ids_BT):
  positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  return token_nll(model(tokens_BT, positions_BT, segment_ids_BT), targets_BT)


@nnx.jit
def _token_nll_greedy(model: Decoder, tokens_BT, targets_BT, segment_ids_BT):
  positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  logits_BTV = model(tokens_BT, positions_BT, segment_ids_BT)
  return token_nll(logits_BTV, targets_BT), jnp.argmax(logits_BTV, axis=-1) == targets_BT


def sequence_nll(model: Decoder, seqs, weights, batch_size: int = 8, progress=None):
  """(sum of NLL in nats, number of scored tokens) per sequence, as numpy arrays.

  `seqs[i]` is a token id list and `weights[i]` (same length) is 1 where that token is scored, i.e.
  predicted from the tokens before it (the first token can never be scored)."""
  return sequence_scores(model, seqs, weights, batch_size, progress, greedy=False)[:2]


def sequence_scores(model: Decoder, seqs, weights, batch_size: int = 8, progress=None, greedy: bool = True):
  """`sequence_nll` plus, per sequence, whether every scored token is the model's argmax (lm-eval's is_greedy)."""
  sums, counts, all_greedy = np.zeros(len(seqs)), np.zeros(len(seqs)), np.ones(len(seqs), bool)
  order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths share a batch: less padding
  for done, start in enumerate(range(0, len(seqs), batch_size), 1):
    idx = order[start:start + batch_size]
    T = max(32, 1 << (max(len(seqs[i]) - 1 for i in idx) - 1).bit_length())  # power-of-two buckets: few compiles
    tokens, targets = np.zeros((batch_size, T), np.int32), np.zeros((batch_size, T), np.int32)
    segs, mask = np.zeros((batch_size, T), np.int32), np.zeros((batch_size, T), np.float64)
    for row, i in enumerate(idx):
      ids = check_token_ids(seqs[i], model.config.vocab_size, f"sequence {i}")
      n = len(ids) - 1
      tokens[row, :n], targets[row, :n], segs[row, :n] = ids[:-1], ids[1:], 1
      mask[row, :n] = np.asarray(weights[i])[1:]
    args = (jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(segs))
    if greedy:
      nll, hit = _token_nll_greedy(model, *args)
      all_greedy[idx] = (np.asarray(hit) | (mask == 0)).all(1)[:len(idx)]
    else:
      nll = _token_nll(model, *args)
    nll = np.asarray(nll, np.float64)
    sums[idx] = (nll * mask).sum(1)[:len(idx)]
    counts[idx] = mask.sum(1)[:len(idx)]
    if progress:
      progress(min(start + batch_size, len(seqs)))
  return sums, counts, all_greedy
