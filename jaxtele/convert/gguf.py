"""GGUF in: Llama-architecture GGUF files -> HF config, HF-named float32 tensors, and an HF tokenizer.

The `gguf` package dequantizes; GGUF stores Q/K rows permuted for its interleaved RoPE, which
`unpermute` undoes so the weights match HF's rotate-half layout.
"""

import os

import numpy as np

from jaxtele.errors import JaxteleError

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer regexes by `tokenizer.ggml.pre` (byte-level BPE vocabularies).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("smollm", "gpt2", "default", "llama-bpe", "qwen2")


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """GGUF (interleaved pairs) -> HF (rotate-half) row order of a Q or K projection [heads*head_dim, in]."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _fields(reader) -> dict:
  return {k: f.contents() for k, f in reader.fields.items()}


def open_gguf(path: str):
  """-> (reader, metadata dict); tensors stay memory-mapped until dequantized."""
  import gguf

  if not os.path.exists(path):
    raise JaxteleError(f"{path}: no such GGUF file")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:
    raise JaxteleError(f"{path}: not a readable GGUF file ({e})") from None
  return reader, _fields(reader)


def read_gguf(path: str):
  """-> (hf_config dict, {hf_name: float32 array}, tokenizer meta dict)."""
  reader, meta = open_gguf(path)
  config = config_from_metadata(reader, meta, path)
  heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
  tensors = {}
  for t in reader.tensors:
    tensors[_hf_name(t.name, path)] = _dequantize(t, heads, kv_heads)
  return config, tensors, meta


def config_from_metadata(reader, meta: dict, path: str) -> dict:
  """The HF config dict a Llama-architecture GGUF describes."""
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise JaxteleError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
  a = lambda key, default=None: meta.get(f"llama.{key}", default)
  heads, kv_heads = a("attention.head_count"), a("attention.head_count_kv") or a("attention.head_count")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise JaxteleError(f"{path}: GGUF rope_freqs (Llama 3.1 RoPE scaling) is not supported; import the HF folder instead")
  hidden = a("embedding_length")
  config = {
      "model_type": "llama",
      "vocab_size": a("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
      "hidden_size": hidden,
      "intermediate_size": a("feed_forward_length"),
      "num_hidden_layers": a("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": a("rope.dimension_count") or hidden // heads,
      "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(a("rope.freq_base", 10000.0)),
      "max_position_embeddings": a("context_length", 2048),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
  }
  return config


def _hf_name(name: str, path: str) -> str:
  parts = name.split(".")
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
    return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
  if len(parts) == 2 and parts[0] in TOP_NAMES:
    return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
  raise JaxteleError(f"{path}: unexpected GGUF tensor {name!r}")


def _dequantize(t, heads, kv_heads) -> np.ndarray:
  import gguf

  w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
  w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
  if t.name.endswith("attn_q.weight"):
    w = unpermute(w, heads)
  elif t.name.endswith("attn_k.weight"):
    w = unpermute(w, kv_heads)
  return w


def build_tokenizer(meta: dict, source: str):
  """An HF fast tokenizer (special tokens and chat template included) from GGUF tokenizer metadata."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise JaxteleError(f"{source}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise JaxteleError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("smollm", "gpt2", "default"))
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("llama-bpe", "qwen2"):
    split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT), "isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # GGUF token types: 3 = control, 4 = user-defined; both are atomic special tokens in HF.
  tok.add_special_tokens([tokens[i] for i, ty in enumerate(types) if ty in (3, 4)])

  def special(key):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special("bos"), eos_token=special("eos"), unk_token=special("unknown"),
      pad_token=special("padding"), chat_template=meta.get("tokenizer.chat_template"),
      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)), model_max_length=1 << 30)
