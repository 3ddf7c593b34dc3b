"""Batched generation with a KV cache: ragged prompts are left-padded into one batch, decoded greedily or by
temperature / top-p sampling (seeded), each row stopping at a stop token or a stop string. Export certificates
use it to check a reloaded model; `jaxtele.eval` (answers, the harness, `python -m jaxtele.eval.generate`)
builds on it.

Shapes are bucketed (prompt length to a multiple of 16, cache to a multiple of 64) so a handful of
compilations serve a whole evaluation. Legend: B batch, P padded prompt length, S cache slots, V vocab.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.errors import JaxteleError
from jaxtele.models.decoder import Decoder, check_token_ids


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  seed: int = 0
  stop_ids: tuple = ()  # a row ends after emitting one of these (it is kept in the ids)
  stop_strings: tuple = ()  # ... or once its decoded text contains one of these (needs a tokenizer)


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def pick(logits_BV, key, temperature: float, top_p: float):
  """Next token per row: argmax when temperature is 0, else a sample from the top-p nucleus."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept = jnp.sum(before_BV < top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, kept - 1, axis=-1)
    logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _prefill(graphdef, state, tokens_BP, positions_BP, cache, key, temperature, top_p):
  model = nnx.merge(graphdef, state)
  x_BPD, cache = model.forward_cached(tokens_BP, positions_BP, cache, 0)
  return pick(model.logits(x_BPD[:, -1]), key, temperature, top_p), cache


def _step(graphdef, state, tok_B, pos_B, cache, index, key, temperature, top_p):
  model = nnx.merge(graphdef, state)
  x_B1D, cache = model.forward_cached(tok_B[:, None], pos_B[:, None], cache, index)
  return pick(model.logits(x_B1D[:, 0]), key, temperature, top_p), cache


def left_pad(prompts: list, length: int, batch: int):
  """Ragged prompts -> tokens and positions [batch, length], right-aligned; padding has position -1.
  Missing rows (a short last batch) are one-token dummies."""
  tokens = np.zeros((batch, length), np.int32)
  positions = np.full((batch, length), -1, np.int32)
  for i in range(batch):
    p = prompts[i] if i < len(prompts) else [0]
    tokens[i, length - len(p):] = p
    positions[i, length - len(p):] = np.arange(len(p))
  return tokens, positions


def _stopped_by_string(tokenizer, ids, stop_strings) -> bool:
  return bool(stop_strings) and any(s in tokenizer.decode(ids) for s in stop_strings)


def generate(model: Decoder, prompts, sampling: Sampling = Sampling(), *, tokenizer=None, batch_size: int = 8,
             progress=None) -> list[list[int]]:
  """New token ids for each prompt (a list of id lists). A stop token is kept at the end of its row."""
  if sampling.stop_strings and tokenizer is None:
    raise JaxteleError("generation: stop strings need a tokenizer")
  prompts = [check_token_ids(p, model.config.vocab_size, f"prompt {i}").tolist() for i, p in enumerate(prompts)]
  for i, p in enumerate(prompts):
    if not p:
      raise JaxteleError(f"prompt {i}: empty prompt")
  graphdef, state = nnx.split(model)
  # The graph definition closes over the functions (it holds lists, so it cannot be a static argument):
  # one compilation per call of `generate` and shape bucket.
  temp, top_p = float(sampling.temperature), float(sampling.top_p)
  fns = (jax.jit(functools.partial(_prefill, graphdef, temperature=temp, top_p=top_p), donate_argnums=(3,)),
         jax.jit(functools.partial(_step, graphdef, temperature=temp, top_p=top_p), donate_argnums=(3,)))
  key = jax.random.key(sampling.seed)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    key, sub = jax.random.split(key)
    out.extend(_generate_batch(model, fns, state, chunk, sampling, tokenizer, batch_size, sub))
    if progress:
      progress(len(out))
  return out


def _generate_batch(model, fns, state, prompts, sampling, tokenizer, batch_size, key):
  prefill, step = fns
  P = _round_up(max(len(p) for p in prompts), 16)
  S = _round_up(P + sampling.max_new_tokens, 64)
  if max(len(p) for p in prompts) + sampling.max_new_tokens > model.config.max_position_embeddings:
    limit = model.config.max_position_embeddings
    raise JaxteleError(f"generation: prompt + max_new_tokens exceeds the model's {limit} "
                       "positions")
  tokens_BP, positions_BP = left_pad(prompts, P, batch_size)
  next_pos_B = np.asarray([len(p) for p in prompts] + [1] * (batch_size - len(prompts)), np.int32)
  cache = model.init_cache(batch_size, S)
  keys = jax.random.split(key, sampling.max_new_tokens)
  tok_B, cache = prefill(state, jnp.asarray(tokens_BP), jnp.asarray(positions_BP), cache, keys[0])
  new = [[] for _ in prompts]
  done = np.zeros(len(prompts), bool)
  for t in range(sampling.max_new_tokens):
    host_B = np.asarray(jax.device_get(tok_B))
    for i in np.flatnonzero(~done):
      new[i].append(int(host_B[i]))
      if host_B[i] in sampling.stop_ids or _stopped_by_string(tokenizer, new[i], sampling.stop_strings):
        done[i] = True
    if done.all() or t + 1 == sampling.max_new_tokens:
      break
    tok_B, cache = step(state, tok_B, jnp.asarray(next_pos_B + t), cache, P + t, keys[t + 1])
  return new


def decode_until_stop(tokenizer, ids, stop_strings=()) -> str:
  """Generated ids -> text without special tokens, cut at the first stop string."""
  text = tokenizer.decode(ids, skip_special_tokens=True)
  for s in stop_strings:
    text = text.split(s, 1)[0]
  return text


def greedy(model: Decoder, prompt_ids, max_new_tokens: int, stop_ids=()) -> list[int]:
  """Continue one prompt greedily; stops at any of `stop_ids` (kept). Returns the new ids only."""
  return generate(model, [prompt_ids], Sampling(max_new_tokens, stop_ids=tuple(stop_ids)), batch_size=1)[0]


def chat_prompt_ids(tokenizer, user_message: str) -> list[int]:
  """Token ids of a one-turn chat prompt in the tokenizer's own template, ending at the assistant's turn."""
  text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], add_generation_prompt=True,
                                       tokenize=False)
  return tokenizer.encode(text, add_special_tokens=False)
