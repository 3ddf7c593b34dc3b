"""Model configuration: one dataclass for the Llama family, read from and written to HF `config.json`."""

import dataclasses
from typing import Any

from jaxtele.errors import JaxteleError

FAMILIES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "llama3", "linear")
# What a remat'd layer keeps for the backward pass (models/decoder.py REMAT): none = no remat.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload_dots")


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
  # Runtime policy, not part of the HF config: parameters and activations may differ.
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"

  @property
  def rope(self) -> dict:
    return dict(self.rope_scaling)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf(cls, hf: dict, source: str = "config.json", **runtime) -> "ModelConfig":
    """Build from an HF config dict; refuses model types and options the decoder does not implement."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
      raise JaxteleError(f"{source}: unsupported model_type {mt!r} (supported: {', '.join(FAMILIES)})")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise JaxteleError(f"{source}: unsupported hidden_act {act!r} (only 'silu')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      if not isinstance(hf.get(key), int):
        raise JaxteleError(f"{source}: missing or non-integer key {key!r}")
    # transformers v5 keeps rope_theta and scaling in `rope_parameters`; v4 in `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
      raise JaxteleError(f"{source}: unsupported rope_type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    rope.pop("type", None)
    rope["rope_type"] = rope_type
    if rope_type == "default":
      rope = {}
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
      raise JaxteleError(f"{source}: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    window = None
    if mt == "mistral":
      window = hf.get("sliding_window")
    elif mt == "qwen2" and hf.get("use_sliding_window"):
      raise JaxteleError(f"{source}: use_sliding_window=true is not supported for qwen2")
    bias = hf.get("attention_bias", False)
    return cls(
        model_type=mt,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=tuple(sorted(rope.items())),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if mt == "qwen2" else bool(bias),
        o_bias=bool(bias) if mt == "llama" else False,
        mlp_bias=bool(hf.get("mlp_bias", False)) if mt == "llama" else False,
        sliding_window=window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        **runtime,
    )

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` transformers needs to rebuild this model."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    rope = {"rope_theta": self.rope_theta, "rope_type": "default", **self.rope}
    hf = {
        "architectures": [arch[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
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
    if self.model_type == "llama":
      hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    if self.model_type == "mistral":
      hf["sliding_window"] = self.sliding_window
    if self.model_type == "qwen2":
      hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
    return hf
