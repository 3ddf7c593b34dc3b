"""Log-likelihood of chosen tokens of many short sequences (answers, options), batched with right padding.

Shape letters (jaxtele/models/__init__.py): B batch, T padded length, V vocab, D hidden, A candidate next tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.loss import token_nll
from jaxtele.models.decoder import Decoder, check_token_ids

K_MAX = 10  # candidates per sequence in `next_token_logprobs` (one shape: one compile per length bucket)


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


@nnx.jit
def _next_logprobs(model: Decoder, tokens_BT, segment_ids_BT, last_B, candidates_BA):
  positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  x_BTD = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT)
  x_B1D = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)  # only the last position reaches the head
  logp_BV = jax.nn.log_softmax(model.logits(x_B1D)[:, 0].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BV, candidates_BA, axis=1)


def next_token_logprobs(model: Decoder, seqs, candidates, batch_size: int = 8, progress=None) -> list[np.ndarray]:
  """log p(c | seqs[i]) for each token id c of candidates[i] (at most `K_MAX`): one forward pass per sequence
  scores all its one-token continuations (answer letters)."""
  out = [None] * len(seqs)
  order = np.argsort([len(s) for s in seqs], kind="stable")
  for start in range(0, len(seqs), batch_size):
    idx = order[start:start + batch_size]
    T = max(32, 1 << (max(len(seqs[i]) for i in idx) - 1).bit_length())
    tokens, segs = np.zeros((batch_size, T), np.int32), np.zeros((batch_size, T), np.int32)
    last, cands = np.zeros(batch_size, np.int32), np.zeros((batch_size, K_MAX), np.int32)
    for row, i in enumerate(idx):
      ids = check_token_ids(seqs[i], model.config.vocab_size, f"sequence {i}")
      tokens[row, :len(ids)], segs[row, :len(ids)], last[row] = ids, 1, len(ids) - 1
      cands[row, :len(candidates[i])] = check_token_ids(candidates[i], model.config.vocab_size, f"candidates {i}")
    logp = np.asarray(_next_logprobs(model, jnp.asarray(tokens), jnp.asarray(segs), jnp.asarray(last),
                                     jnp.asarray(cands)), np.float64)
    for row, i in enumerate(idx):
      out[i] = logp[row, :len(candidates[i])]
    if progress:
      progress(min(start + batch_size, len(seqs)))
  return out
