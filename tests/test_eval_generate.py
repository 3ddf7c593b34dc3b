"""KV-cache generation: ragged prompts in one batch against cache-less greedy decoding (full recompute with the
training forward pass), sampling controls, and greedy text against `transformers` on the real model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtele.convert import load_pretrained
from jaxtele.generation import Sampling, generate, pick


@nnx.jit
def _full_forward(model, tokens_1L, length):
  idx = jnp.arange(tokens_1L.shape[1])
  # Slots past `length` are padding (segment 0), which causal attention never reads for earlier queries.
  logits_1LV = model(tokens_1L, idx[None], (idx < length).astype(jnp.int32)[None])
  return jnp.argmax(logits_1LV[0, length - 1])


def recompute_greedy(model, prompt, n, stop=(), buf=64):
  """The reference: every step runs the whole sequence through the plain (training) forward pass."""
  seq, out = list(prompt), []
  for _ in range(n):
    tok = int(_full_forward(model, jnp.asarray([seq + [0] * (buf - len(seq))]), len(seq)))
    out.append(tok)
    seq.append(tok)
    if tok in stop:
      break
  return out


@pytest.fixture(scope="module", params=["mistral_window", "gqa_kv1", "qwen2_bias", "qwen3", "gemma2", "gemma3"])
def tiny_model(request, make_hf_model, tmp_path_factory):
  # Sharper weights than make_hf_model's, so greedy paths vary instead of repeating one token.
  import torch

  ref = make_hf_model(request.param, seed=3)
  scale = 2.0 if request.param.startswith("gemma") else 6.0  # Gemma's sqrt(D) embeddings saturate sooner
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" not in name:
        p.mul_(scale)
  folder = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(folder)
  return load_pretrained(str(folder)).model


def test_kv_cache_matches_recompute_on_ragged_batch(tiny_model):
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 97, n).tolist() for n in (1, 5, 13, 22, 9)]
  # batch_size 4: a full batch and a short one (padded with dummy rows); 20 steps cross the sliding window (8).
  got = generate(tiny_model, prompts, Sampling(20), batch_size=4)
  want = [recompute_greedy(tiny_model, p, 20) for p in prompts]
  assert got == want
  assert len({tuple(w) for w in want}) > 1 and any(len(set(w)) > 3 for w in want)  # a non-degenerate case


def test_stop_token_ends_only_its_row(tiny_model):
  prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45]]
  free = [recompute_greedy(tiny_model, p, 12) for p in prompts]
  stop = free[0][3]
  got = generate(tiny_model, prompts, Sampling(12, stop_ids=(stop,)), batch_size=2)
  assert got == [recompute_greedy(tiny_model, p, 12, stop=(stop,)) for p in prompts]
  assert got[0][-1] == stop and len(got[0]) <= 4


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tiny_model):
  prompts = [[5, 6, 7], [40, 41, 42, 43]]
  a = generate(tiny_model, prompts, Sampling(16, temperature=1.0, seed=1), batch_size=2)
  b = generate(tiny_model, prompts, Sampling(16, temperature=1.0, seed=1), batch_size=2)
  c = generate(tiny_model, prompts, Sampling(16, temperature=1.0, seed=2), batch_size=2)
  assert a == b and a != c
  # A nucleus of mass 1e-6 holds only the most likely token: sampling collapses to greedy.
  nucleus = generate(tiny_model, prompts, Sampling(16, temperature=1.0, top_p=1e-6, seed=5), batch_size=2)
  assert nucleus == [recompute_greedy(tiny_model, p, 16) for p in prompts]


def test_top_p_keeps_the_smallest_nucleus():
  import jax

  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(pick(logits, k, 1.0, 0.7)[0]) for k in jax.random.split(jax.random.key(0), 200)}
  assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: exactly the two best tokens


@pytest.mark.slow
def test_greedy_matches_transformers_generate(smollm2, smollm2_hf):
  import torch

  from jaxtele.generation import chat_prompt_ids

  _, ref = smollm2_hf
  tok = smollm2.tokenizer
  prompts = [chat_prompt_ids(tok, "What is the capital of France?"), tok.encode("The 5G core network consists of")]
  got = generate(smollm2.model, prompts, Sampling(32), batch_size=2)
  for p, g in zip(prompts, got, strict=True):
    with torch.no_grad():
      out = ref.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(p):].tolist()
    assert g == out, (tok.decode(g), tok.decode(out))
