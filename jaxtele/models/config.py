"""Model configuration: one dataclass for the decoder's families, read from and written to HF `config.json`.

A family is a set of switches on the one decoder (norm offset, embedding scale, activation, soft-capping,
sandwich norms, q/k norms, per-layer sliding window and RoPE base), not a separate model.
"""

import dataclasses
from typing import Any

from jaxtele.errors import JaxteleError
from jaxtele.models.layers import ACTIVATIONS

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text")
GEMMAS = ("gemma", "gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Extra RoPE parameters for scaled variants: a sorted tuple of (key, value) so the config stays hashable.
  rope_scaling: tuple = ()
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = True
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | list | None = None
  pad_token_id: int | None = None
  hidden_act: str = "silu"  # silu (SwiGLU) or gelu_pytorch_tanh (GeGLU, Gemma)
  norm_offset: float = 0.0  # Gemma: RMSNorm scales by (offset + w), w stored as HF stores it
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP outputs, and before the MLP
  qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over each head's q and k before RoPE
  query_pre_attn_scalar: int | float | None = None  # scores scale by its -1/2 power (None: head_dim)
  attn_softcap: float | None = None  # scores -> tanh(scores / cap) * cap before masking
  final_softcap: float | None = None  # the same on the output logits
  # Per layer "sliding_attention" / "full_attention"; () means every layer alike (sliding iff sliding_window).
  layer_types: tuple = ()
  rope_local_theta: float | None = None  # Gemma 3: sliding layers' RoPE base (no scaling)
  # Runtime policy, not part of the HF config: parameters and activations may differ.
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"
  scan_layers: bool = False  # one compiled body for repeating layers (models/scan.py); same tree, same values

  @property
  def rope(self) -> dict:
    return dict(self.rope_scaling)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def is_sliding(self, layer: int) -> bool:
    if not self.sliding_window:
      return False
    return not self.layer_types or self.layer_types[layer] == "sliding_attention"

  def layer_window(self, layer: int) -> int | None:
    """Layer `layer`'s sliding window (None: full causal attention)."""
    return self.sliding_window if self.is_sliding(layer) else None

  def layer_rope(self, layer: int) -> "ModelConfig":
    """The config whose rope_theta / rope_scaling layer `layer` rotates with (Gemma 3's local layers differ)."""
    if self.rope_local_theta is not None and self.layer_types and self.layer_types[layer] == "sliding_attention":
      return self.replace(rope_theta=self.rope_local_theta, rope_scaling=())
    return self

  @classmethod
  def from_hf(cls, hf: dict, source: str = "config.json", **runtime) -> "ModelConfig":
    """Build from an HF config dict; refuses model types and options the decoder does not implement."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
      raise JaxteleError(f"{source}: unsupported model_type {mt!r} (supported: {', '.join(FAMILIES)})")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if mt == "gemma" and act == "gelu":  # legacy Gemma configs; transformers reads it as the tanh approximation
      act = "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
      raise JaxteleError(f"{source}: unsupported hidden activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      if not isinstance(hf.get(key), int):
        raise JaxteleError(f"{source}: missing or non-integer key {key!r}")
    if hf.get("use_bidirectional_attention"):
      raise JaxteleError(f"{source}: use_bidirectional_attention=true is not supported (causal decoders only)")
    layers = hf["num_hidden_layers"]
    rope, theta, local_theta = _rope_from_hf(hf, mt, source)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
      raise JaxteleError(f"{source}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    window, layer_types = _windows_from_hf(hf, mt, layers, source)
    bias = bool(hf.get("attention_bias", False))
    gemma = mt in GEMMAS
    sandwich = mt in ("gemma2", "gemma3_text")
    return cls(
        model_type=mt,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=True if mt == "qwen2" else bias,
        o_bias=bias if mt not in ("qwen2", "mistral") else False,
        mlp_bias=bool(hf.get("mlp_bias", False)) if mt == "llama" else False,
        sliding_window=window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        hidden_act=act,
        norm_offset=1.0 if gemma else 0.0,
        embed_scale=gemma,
        sandwich_norms=sandwich,
        qk_norm=mt in ("qwen3", "gemma3_text"),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if sandwich else None,
        # transformers' Gemma 3 attention never applies attn_logit_softcapping (llama.cpp asserts it is unset).
        attn_softcap=_opt_float(hf.get("attn_logit_softcapping")) if mt == "gemma2" else None,
        final_softcap=_opt_float(hf.get("final_logit_softcapping")) if sandwich else None,
        layer_types=layer_types,
        rope_local_theta=local_theta,
        **runtime,
    )

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` transformers needs to rebuild this model."""
    rope = {"rope_theta": self.rope_theta, "rope_type": "default", **self.rope}
    hf = {
        "architectures": [ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": self.hidden_act,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
        "initializer_range": 0.02,
    }
    mt = self.model_type
    if mt == "llama":
      hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    if mt == "mistral":
      hf["sliding_window"] = self.sliding_window
    if mt in ("qwen2", "qwen3"):
      hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
    if mt in ("qwen3", "gemma", "gemma2", "gemma3_text"):
      hf["attention_bias"] = self.qkv_bias
    if mt in ("gemma2", "gemma3_text"):
      hf["hidden_activation"] = hf.pop("hidden_act")
      hf.update( query_pre_attn_scalar=self.query_pre_attn_scalar,
                attn_logit_softcapping=self.attn_softcap, final_logit_softcapping=self.final_softcap,
                sliding_window=self.sliding_window, layer_types=list(self.layer_types))
    if mt == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": self.rope_local_theta}
      hf.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                rope_local_base_freq=self.rope_local_theta)
    return hf


def _opt_float(x):
  return None if x is None else float(x)


def _rope_from_hf(hf: dict, mt: str, source: str):
  """-> (global scaling dict, global theta, local theta or None). transformers v5 keeps RoPE settings in
  `rope_parameters` (Gemma 3: one dict per layer type); v4 in `rope_theta` + `rope_scaling`."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  local_theta = None
  if mt == "gemma3_text":
    if "full_attention" in params or "sliding_attention" in params:
      local = dict(params.get("sliding_attention") or {})
      params = dict(params.get("full_attention") or {})
    else:
      local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    local_type = local.get("rope_type", local.get("type", "default"))
    if local_type != "default":
      raise JaxteleError(f"{source}: sliding_attention rope_type {local_type!r} is not supported (only 'default')")
    local_theta = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))
  default_theta = 1_000_000.0 if mt == "gemma3_text" else 10000.0
  theta = params.pop("rope_theta", hf.get("rope_theta", default_theta))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise JaxteleError(f"{source}: unsupported rope_type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
  params.pop("type", None)
  params["rope_type"] = rope_type
  return ({} if rope_type == "default" else params), theta, local_theta


def _windows_from_hf(hf: dict, mt: str, layers: int, source: str):
  """-> (sliding_window, layer_types): which layers attend within a window, as transformers decides."""
  if mt == "mistral":
    return hf.get("sliding_window"), ()
  if mt in ("qwen2", "qwen3"):
    if hf.get("use_sliding_window"):
      raise JaxteleError(f"{source}: use_sliding_window=true is not supported for {mt}")
    return None, ()
  if mt not in ("gemma2", "gemma3_text"):
    return None, ()
  types = hf.get("layer_types")
  if types is None:  # older configs: every `pattern`-th layer is global
    pattern = 2 if mt == "gemma2" else int(hf.get("sliding_window_pattern", 6))
    types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
  bad = [t for t in types if t not in LAYER_TYPES]
  if len(types) != layers or bad:
    raise JaxteleError(f"{source}: layer_types must list {layers} of {', '.join(LAYER_TYPES)}"
                       f"{f', got {bad[0]!r}' if bad else f', got {len(types)}'}")
  return hf.get("sliding_window"), tuple(types)
