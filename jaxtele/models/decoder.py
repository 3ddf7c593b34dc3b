"""One decoder for llama, qwen2, mistral, qwen3, gemma, gemma2 and gemma3: GQA, RMSNorm, gated MLP, RoPE.

Family differences are configuration (models/config.py), not code: biases, tied head, RoPE scaling, per-layer
sliding window and RoPE base, activation (SwiGLU / GeGLU), Gemma's (1 + w) norms and sqrt(D) embedding scale,
sandwich norms, q/k norms, the attention scale and soft-capping of attention and output logits.
Module names follow Hugging Face: `embed_tokens`, `layers.{i}.self_attn.q_proj`, `self_attn.q_norm`,
`mlp.gate_proj`, `input_layernorm`, `post_attention_layernorm`, `pre_feedforward_layernorm`,
`post_feedforward_layernorm`, `norm`, `lm_head`.
Shape letters: jaxtele/models/__init__.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.errors import ArgumentError, JaxteleError
from jaxtele.models import adapters, scan
from jaxtele.models.attention import apply_rope, attention, cached_attention, resolve_attention, rope_inv_freq
from jaxtele.models.config import ModelConfig
from jaxtele.models.layers import ACTIVATIONS, Embed, Linear, RMSNorm


# What a rematerialised layer keeps for the backward pass. none: everything (no remat); full: nothing but the
# layer input; dots_saveable: every matmul output; dots_with_no_batch_dims_saveable: the weight matmuls
# (projections), not attention's batched ones; offload_dots: those projections, kept in pinned host memory
# instead of HBM (GPU/TPU only: config.validate refuses it elsewhere, before any trace).
_CP = jax.checkpoint_policies
REMAT = {"none": None, "full": None, "dots_saveable": _CP.dots_saveable,
         "dots_with_no_batch_dims_saveable": _CP.dots_with_no_batch_dims_saveable,
         "offload_dots": _CP.offload_dot_with_no_batch_dims("device", "pinned_host")}
REMAT_POLICIES = tuple(REMAT)
HOST_OFFLOAD_REMAT = ("offload_dots",)  # the policies that need a GPU or TPU


def remat(layer_call, policy: str):
  """A layer's forward under a rematerialisation policy (a name of `REMAT`, checked by `settled`)."""
  if policy == "none":
    return layer_call
  return nnx.remat(layer_call, policy=REMAT[policy])


def model_attention(cfg: ModelConfig, backend: str | None = None) -> str:
  """The attention implementation `cfg.attention` runs on this backend (models/attention.resolve_attention)."""
  windows = [w for w in (cfg.layer_window(i) for i in range(cfg.num_layers)) if w]
  return resolve_attention(cfg.attention, cfg.dtype, cfg.head_dim, windows[0] if windows else None, backend,
                           softcap=cfg.attn_softcap)


def settled(cfg: ModelConfig) -> ModelConfig:
  """`cfg` as a Decoder runs it: the remat policy checked and `auto` attention decided for this backend, once,
  at construction, so that no trace asks the backend or meets an unknown name. (build.model_config settles a
  run's config first, naming its keys.) Explicit attention names pass through: a run trained with `cudnn` still
  loads on a CPU, and `attention()` refuses it there when traced."""
  if cfg.remat not in REMAT:
    raise ArgumentError("remat", f"unknown policy {cfg.remat!r} (choose from {', '.join(REMAT_POLICIES)})")
  return cfg.replace(attention=model_attention(cfg)) if cfg.attention == "auto" else cfg


def norm(cfg: ModelConfig, dim: int | None = None) -> RMSNorm:
  return RMSNorm(dim or cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=cfg.param_dtype, offset=cfg.norm_offset)


def softcap(x, cap):
  """tanh(x / cap) * cap (Gemma 2's soft-capping); identity without a cap."""
  return x if not cap else jnp.tanh(x / cap) * cap


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs, layer: int = 0):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = Linear(D, N * H, use_bias=cfg.qkv_bias, **kw)
    self.k_proj = Linear(D, K * H, use_bias=cfg.qkv_bias, **kw)
    self.v_proj = Linear(D, K * H, use_bias=cfg.qkv_bias, **kw)
    self.o_proj = Linear(N * H, D, use_bias=cfg.o_bias, **kw)
    self.q_norm = nnx.data(norm(cfg, H) if cfg.qk_norm else None)
    self.k_norm = nnx.data(norm(cfg, H) if cfg.qk_norm else None)
    self.shape = (N, K, H)
    self.sliding_window = cfg.layer_window(layer)
    self.impl = cfg.attention
    self.softcap = cfg.attn_softcap
    # The kernels divide scores by sqrt(H); a different scale (query_pre_attn_scalar) is folded into q.
    scalar = cfg.query_pre_attn_scalar
    self.q_scale = math.sqrt(H / scalar) if scalar and scalar != H else None
    self.inv_freq = rope_inv_freq(cfg.layer_rope(layer)).tolist()  # static: a list, not an array leaf

  def qkv(self, x_BTD, positions_BT):
    """Projected, normed, rotated (and for q, rescaled) q [B, T, N, H], k, v [B, T, K, H]."""
    N, K, H = self.shape
    B, T, _ = x_BTD.shape
    inv_freq = np.asarray(self.inv_freq, np.float32)
    q_BTNH = self.q_proj(x_BTD).reshape(B, T, N, H)
    k_BTKH = self.k_proj(x_BTD).reshape(B, T, K, H)
    if self.q_norm is not None:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    if self.q_scale is not None:
      q_BTNH = (q_BTNH.astype(jnp.float32) * np.float32(self.q_scale)).astype(q_BTNH.dtype)
    v_BTKH = self.v_proj(x_BTD).reshape(B, T, K, H)
    return q_BTNH, k_BTKH, v_BTKH

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    N, K, H = self.shape
    B, T, _ = x_BTD.shape
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, positions_BT)
    out_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, sliding_window=self.sliding_window,
                         impl=self.impl, softcap=self.softcap)
    return self.o_proj(out_BTNH.reshape(B, T, N * H))

  def cached(self, x_BTD, positions_BT, layer_cache, k_pos_BS, index):
    """Generation: write this step's keys/values at slot `index` of the cache, attend over all of it."""
    N, K, H = self.shape
    B, T, _ = x_BTD.shape
    q_BTNH, k_BTKH, v_BTKH = self.qkv(x_BTD, jnp.maximum(positions_BT, 0))  # padding (-1) is never attended to
    k_BSKH = jax.lax.dynamic_update_slice(layer_cache["k"], k_BTKH.astype(layer_cache["k"].dtype), (0, index, 0, 0))
    v_BSKH = jax.lax.dynamic_update_slice(layer_cache["v"], v_BTKH.astype(layer_cache["v"].dtype), (0, index, 0, 0))
    out_BTNH = cached_attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), positions_BT,
                                k_pos_BS, sliding_window=self.sliding_window, softcap=self.softcap)
    return self.o_proj(out_BTNH.reshape(B, T, N * H)), {"k": k_BSKH, "v": v_BSKH}


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_proj = Linear(D, F, **kw)
    self.up_proj = Linear(D, F, **kw)
    self.down_proj = Linear(F, D, **kw)
    self.act = cfg.hidden_act

  def __call__(self, x_BTD):
    return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class DecoderLayer(nnx.Module):
  """Pre-norm residual block. With sandwich norms (Gemma 2/3) `post_attention_layernorm` normalises the attention
  output and `pre_`/`post_feedforward_layernorm` wrap the MLP; otherwise `post_attention_layernorm` is the
  MLP's input norm (Llama)."""

  def __init__(self, cfg: ModelConfig, rngs, layer: int = 0):
    self.input_layernorm = norm(cfg)
    self.self_attn = Attention(cfg, rngs, layer)
    self.post_attention_layernorm = norm(cfg)
    self.pre_feedforward_layernorm = nnx.data(norm(cfg) if cfg.sandwich_norms else None)
    self.post_feedforward_layernorm = nnx.data(norm(cfg) if cfg.sandwich_norms else None)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    return self.after_attention(x_BTD, self.self_attn(self.input_layernorm(x_BTD), positions_BT, segment_ids_BT))

  def cached(self, x_BTD, positions_BT, layer_cache, k_pos_BS, index):
    attn_BTD, layer_cache = self.self_attn.cached(self.input_layernorm(x_BTD), positions_BT, layer_cache, k_pos_BS,
                                                  index)
    return self.after_attention(x_BTD, attn_BTD), layer_cache

  def after_attention(self, x_BTD, attn_BTD):
    """The residual adds and the MLP, with or without sandwich norms."""
    if self.pre_feedforward_layernorm is None:
      x_BTD = x_BTD + attn_BTD
      return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
    x_BTD = x_BTD + self.post_attention_layernorm(attn_BTD)
    return x_BTD + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x_BTD)))


def _counted_layer_call(layer, x_BTD, positions_BT, segment_ids_BT, calls):
  """A layer's forward that takes and returns the adapters' dropout call count (None without dropout): the
  count crosses a scan or remat as a value. (A remat'd function is traced once and reused for every layer of
  the same shape, so a count kept only on the context would give every layer the same dropout masks.)"""
  adapters.set_dropout_calls(calls)
  x_BTD = layer(x_BTD, positions_BT, segment_ids_BT)
  return x_BTD, adapters.dropout_calls() if calls is not None else None


class Decoder(nnx.Module):
  """tokens, positions, segment_ids [B, T] int32 -> logits [B, T, V] (compute dtype)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    cfg = settled(cfg)
    self.config = cfg
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              rngs=rngs, scale=math.sqrt(cfg.hidden_size) if cfg.embed_scale else None)
    self.layers = nnx.List([DecoderLayer(cfg, rngs, i) for i in range(cfg.num_layers)])
    self.norm = norm(cfg)
    self.lm_head = nnx.data(None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs))

  def hidden_states(self, tokens_BT, positions_BT, segment_ids_BT):
    x_BTD = self.embed_tokens(tokens_BT)
    block = remat(_counted_layer_call, self.config.remat)  # the policy applies per layer, scanned or not
    x_BTD = scan.run_layers(self.layers, block, x_BTD, positions_BT, segment_ids_BT, scan=self.config.scan_layers)
    return self.norm(x_BTD)

  def output_matrix(self):
    """The effective output matrix [D, V] in compute dtype: tied embedding, lm_head, or lm_head with its active
    adapter merged. Logits are h @ it only without final soft-capping, which the chunked loss does not apply."""
    if self.config.final_softcap:
      raise JaxteleError(f"{self.config.model_type} soft-caps its final logits (final_logit_softcapping="
                         f"{self.config.final_softcap}): they are not h @ the output matrix")
    if self.lm_head is None:
      return self.embed_tokens.embedding[...].astype(self.config.dtype).T
    return self.lm_head.effective_kernel(self.lm_head.dtype)

  def logits(self, x_BTD):
    logits_BTV = self.embed_tokens.attend(x_BTD) if self.lm_head is None else self.lm_head(x_BTD)
    return softcap(logits_BTV, self.config.final_softcap)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    return self.logits(self.hidden_states(tokens_BT, positions_BT, segment_ids_BT))

  # --- Generation with a KV cache (additive: training never calls these). ---

  def init_cache(self, batch: int, size: int, dtype=None) -> dict:
    """An empty cache of `size` slots: per layer keys/values [B, S, K, H], and each slot's position (-1: empty)."""
    cfg = self.config
    shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_layers)]
    return {"layers": layers, "pos": jnp.full((batch, size), -1, jnp.int32)}

  def forward_cached(self, tokens_BT, positions_BT, cache: dict, index):
    """T new tokens at slots [index, index + T) -> (final hidden states [B, T, D], updated cache).

    `positions_BT` is -1 on padding (left padding of ragged prompts): those slots stay invisible. Apply
    `logits()` to the rows you need (usually the last), which saves the [B, T, V] logits of a prefill.
    """
    k_pos_BS = jax.lax.dynamic_update_slice(cache["pos"], positions_BT.astype(jnp.int32), (0, index))
    x_BTD = self.embed_tokens(tokens_BT)
    layers = []
    for layer, layer_cache in zip(self.layers, cache["layers"], strict=True):
      x_BTD, layer_cache = layer.cached(x_BTD, positions_BT, layer_cache, k_pos_BS, index)
      layers.append(layer_cache)
    return self.norm(x_BTD), {"layers": layers, "pos": k_pos_BS}


def init_model(cfg: ModelConfig, seed: int = 0) -> Decoder:
  return Decoder(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Decoder:
  """The model's structure with shape-only leaves: a template to load weights into without allocating twice."""
  return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0)))


def check_token_ids(tokens, vocab_size: int, source: str = "input"):
  """Ids outside [0, vocab) become a silent NaN inside a jitted gather; refuse them on the host."""
  tokens = np.asarray(tokens)
  bad = (tokens < 0) | (tokens >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise JaxteleError(f"{source}: token id {int(tokens[where])} at index {where} is outside the vocabulary [0, {vocab_size})")
  return tokens
