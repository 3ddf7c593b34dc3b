"""GGUF out: a Decoder (adapters merged by the caller) and its tokenizer -> one `.gguf` file in llama.cpp's layout.

The inverse of convert/gguf.py, following llama.cpp's convert_hf_to_gguf.py per architecture: Llama Q/K rows
permuted for the interleaved RoPE, Gemma norms stored with +1, Llama 3.1 RoPE scaling as a `rope_freqs`
tensor, tied heads written once. Quantization: matrices in f16, bf16 or q8_0 (rows that q8_0's 32-wide
blocks cannot tile stay f16); vectors (norms, biases) in f32, as llama.cpp does.
"""

import json

import numpy as np

from jaxtele.convert.gguf import ARCHITECTURES, LAYER_NAMES, NORM_PLUS_ONE, PERMUTED_QK, SANDWICH, TOP_NAMES
from jaxtele.errors import JaxteleError

QUANTS = ("f32", "f16", "bf16", "q8_0")
GGUF_ARCH = {v: k for k, v in ARCHITECTURES.items()}  # HF model_type -> GGUF architecture
# llama.cpp's LlamaFileType per quant (general.file_type).
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """HF (rotate-half) -> GGUF (interleaved pairs) row order of a Q or K projection; inverse of gguf.unpermute."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str, arch: str) -> str:
  """'model.layers.3.mlp.up_proj.weight' -> 'blk.3.ffn_up.weight'."""
  top = {v: k for k, v in TOP_NAMES.items()}
  module, leaf = hf_name.rsplit(".", 1)
  if module in top:
    return f"{top[module]}.{leaf}"
  _, _, layer, rest = module.split(".", 3)
  layer_names = {v: k for k, v in LAYER_NAMES.items() if k not in ("attn_norm",)}
  layer_names["input_layernorm"] = "attn_norm"
  if arch in SANDWICH:
    layer_names.update(post_attention_layernorm="post_attention_norm", pre_feedforward_layernorm="ffn_norm")
  else:
    layer_names["post_attention_layernorm"] = "ffn_norm"
  return f"blk.{layer}.{layer_names[rest]}.{leaf}"


def check_exportable(cfg) -> str:
  """The GGUF architecture for `cfg`, or a one-line refusal of what llama.cpp could not represent."""
  arch = GGUF_ARCH.get(cfg.model_type)
  if cfg.model_type == "mistral" and not cfg.sliding_window:
    arch = "llama"
  if arch is None:
    raise JaxteleError(f"--format gguf: model_type {cfg.model_type!r} cannot be written to GGUF "
                       f"(supported: {', '.join(GGUF_ARCH)})")
  if arch in SANDWICH:
    big = cfg.num_layers == (46 if arch == "gemma2" else 62)
    assumed = cfg.hidden_size // cfg.num_heads if big else cfg.head_dim
    if cfg.query_pre_attn_scalar != assumed:
      raise JaxteleError(f"--format gguf: query_pre_attn_scalar={cfg.query_pre_attn_scalar} has no GGUF key "
                         f"(llama.cpp assumes {assumed} for this {arch})")
  kind = cfg.rope.get("rope_type", "default")
  if kind not in ("default", "linear", "llama3") or (kind == "llama3" and arch != "llama"):
    raise JaxteleError(f"--format gguf: rope_type {kind!r} cannot be written for {arch}")
  return arch


def _metadata(w, cfg, arch: str):
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_vocab_size(cfg.vocab_size)
  if arch == "llama":
    w.add_rope_dimension_count(cfg.head_dim)
  if cfg.rope.get("rope_type") == "linear":
    import gguf

    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope["factor"])
  if arch == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_softcap)
    w.add_final_logit_softcapping(cfg.final_softcap)
  if arch in SANDWICH and cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
  if arch == "gemma3":
    if cfg.final_softcap:
      w.add_final_logit_softcapping(cfg.final_softcap)
    w.add_rope_freq_base_swa(cfg.rope_local_theta)


def _tensors(model, arch: str) -> dict:
  """GGUF-named float32 arrays in llama.cpp's layout."""
  from jaxtele.convert.hf import to_hf_tensors
  from jaxtele.models.attention import rope_inv_freq

  cfg = model.config
  out = {}
  for name, x in to_hf_tensors(model, np.float32).items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    if arch in PERMUTED_QK and name.endswith("q_proj.weight"):
      x = permute(x, cfg.num_heads)
    elif arch in PERMUTED_QK and name.endswith("k_proj.weight"):
      x = permute(x, cfg.num_kv_heads)
    if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
      x = x + np.float32(1)
    out[gguf_name(name, arch)] = x
  if cfg.rope.get("rope_type") == "llama3":  # the divisor of each frequency, as llama.cpp bakes it
    out["rope_freqs.weight"] = (rope_inv_freq(cfg.replace(rope_scaling=())) / rope_inv_freq(cfg)).astype(np.float32)
  return out


def _quantize(x: np.ndarray, quant: str):
  """-> (data, GGMLQuantizationType or None for plain f32)."""
  import gguf

  Q = gguf.GGMLQuantizationType
  if x.ndim < 2 or quant == "f32":
    return x.astype(np.float32), None
  if quant == "q8_0" and x.shape[-1] % 32 == 0:
    return gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0
  if quant == "bf16":
    return gguf.quants.quantize(x, Q.BF16), Q.BF16
  return x.astype(np.float16), None


def _tokenizer_metadata(w, tokenizer, cfg):
  """Vocabulary, merges or scores, token types, special ids, chat template: as llama.cpp writes them."""
  if tokenizer is None:
    raise JaxteleError("--format gguf: the source has no tokenizer; a GGUF must carry one")
  state = json.loads(tokenizer.backend_tokenizer.to_str())
  model = state["model"]
  if model.get("type") != "BPE":
    raise JaxteleError(f"--format gguf: a {model.get('type')} tokenizer cannot be written (BPE only)")
  vocab = {**model["vocab"], **{t["content"]: t["id"] for t in state.get("added_tokens", [])}}
  n = max(cfg.vocab_size, max(vocab.values()) + 1)
  tokens = [f"[PAD{i}]" for i in range(n)]
  for t, i in vocab.items():
    tokens[i] = t
  added = {t["id"]: t for t in state.get("added_tokens", [])}
  byte_fallback = bool(model.get("byte_fallback"))
  types = []
  for i, t in enumerate(tokens):
    if i in added:
      types.append(3 if added[i].get("special") else 4)
    elif byte_fallback and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
      types.append(6)
    elif t.startswith("[PAD") and t not in vocab:
      types.append(5)
    else:
      types.append(1)
  if byte_fallback:  # SentencePiece BPE: llama.cpp stores scores, not merges; file order is merge order
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(n)])
    w.add_token_types(types)
  else:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(state))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
  ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
         "pad": tokenizer.pad_token_id}
  ids = {k: v if v is not None else getattr(cfg, f"{k}_token_id", None) for k, v in ids.items()}
  for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                   ("pad", w.add_pad_token_id)):
    if isinstance(ids[key], int):
      add(ids[key])
  w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
  if getattr(tokenizer, "chat_template", None):
    w.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(state: dict) -> str:
  """`tokenizer.ggml.pre` for a byte-level BPE: which split regex the pre-tokenizer uses."""
  from jaxtele.convert.gguf import _LLAMA3_SPLIT, _QWEN2_SPLIT

  text = json.dumps(state.get("pre_tokenizer"))
  if '"individual_digits": true' in text:
    return "smollm"
  if json.dumps(_LLAMA3_SPLIT)[1:-1] in text:
    return "llama-bpe"
  if json.dumps(_QWEN2_SPLIT)[1:-1] in text:
    return "qwen2"
  return "gpt2"


def save_gguf(model, path: str, *, tokenizer=None, quant: str = "f16", name: str = "jaxtele"):
  """Write `model` (no live adapters: merge them first) and `tokenizer` to the GGUF file `path`."""
  import gguf

  if quant not in QUANTS:
    raise JaxteleError(f"--quant: cannot write {quant!r} (choose from {', '.join(QUANTS)})")
  cfg = model.config
  arch = check_exportable(cfg)
  w = gguf.GGUFWriter(path, arch)
  w.add_name(name)
  w.add_file_type(FILE_TYPES[quant])
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  _metadata(w, cfg, arch)
  _tokenizer_metadata(w, tokenizer, cfg)
  for tname, x in _tensors(model, arch).items():
    data, qtype = _quantize(x, quant)
    if qtype is None:
      w.add_tensor(tname, data)
    else:
      w.add_tensor(tname, data, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
