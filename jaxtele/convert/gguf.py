"""GGUF in: llama, qwen2, qwen3, gemma, gemma2 and gemma3 GGUF files -> HF config, HF-named float32 tensors,
and an HF tokenizer (byte-level BPE or SentencePiece).

Layouts follow llama.cpp's convert_hf_to_gguf.py: the `gguf` package dequantizes; Llama GGUFs store Q/K rows
permuted for the interleaved RoPE (`unpermute` undoes it; qwen and gemma are stored as HF has them); Gemma
stores every RMSNorm weight with its +1 already added; Llama 3.1 RoPE scaling is baked into `rope_freqs`.
"""

import os

import numpy as np

from jaxtele.errors import JaxteleError

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
                 "gemma3": "gemma3_text"}  # GGUF general.architecture -> HF model_type
PERMUTED_QK = ("llama",)
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3")
SANDWICH = ("gemma2", "gemma3")
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
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
  arch = meta["general.architecture"]
  tensors = {}
  for t in reader.tensors:
    if t.name == "rope_freqs.weight":
      continue  # folded into the config's rope_parameters (checked there)
    w = dequantize(t)
    if arch in PERMUTED_QK and t.name.endswith("attn_q.weight"):
      w = unpermute(w, config["num_attention_heads"])
    elif arch in PERMUTED_QK and t.name.endswith("attn_k.weight"):
      w = unpermute(w, config["num_key_value_heads"])
    if arch in NORM_PLUS_ONE and t.name.endswith("norm.weight"):
      w = w - np.float32(1)
    tensors[_hf_name(t.name, arch, path)] = w
  return config, tensors, meta


def config_from_metadata(reader, meta: dict, path: str) -> dict:
  """The HF config dict a GGUF of a supported architecture describes."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise JaxteleError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
  a = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  heads = a("attention.head_count")
  kv_heads = a("attention.head_count_kv") or heads
  names = {t.name for t in reader.tensors}
  hidden, layers = a("embedding_length"), a("block_count")
  head_dim = a("attention.key_length") or a("rope.dimension_count") or hidden // heads
  config = {
      "model_type": ARCHITECTURES[arch],
      "vocab_size": a("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
      "hidden_size": hidden,
      "intermediate_size": a("feed_forward_length"),
      "num_hidden_layers": layers,
      "num_attention_heads": heads,
      "num_key_value_heads": kv_heads,
      "head_dim": head_dim,
      "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(a("rope.freq_base", 1e6 if arch == "gemma3" else 10000.0)),
      "max_position_embeddings": a("context_length", 2048),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
      "attention_bias": "blk.0.attn_q.bias" in names and arch != "qwen2",
      "mlp_bias": "blk.0.ffn_gate.bias" in names,
  }
  if a("rope.scaling.type") == "linear":
    config["rope_parameters"] = {"rope_type": "linear", "factor": float(a("rope.scaling.factor")),
                                 "rope_theta": config["rope_theta"]}
  if "rope_freqs.weight" in names:
    config["rope_parameters"] = llama3_rope_from_factors(
        rope_factors(reader), config["rope_theta"], head_dim, path)
  if arch in NORM_PLUS_ONE:
    config["hidden_activation"] = config["hidden_act"] = "gelu_pytorch_tanh"
  if arch in SANDWICH:
    config.update(_gemma_windows(arch, a, layers, hidden, heads, head_dim))
  return config


def _gemma_windows(arch, a, layers, hidden, heads, head_dim) -> dict:
  """Gemma 2/3 settings llama.cpp keeps in metadata or, where it hard-codes them, as llama.cpp does: the
  sliding pattern (2 / 6, or `attention.sliding_window_pattern`), the local RoPE base (10000, or
  `rope.freq_base_swa`) and the attention scale (1/sqrt(head_dim); 1/sqrt(D/N) for the 27B models)."""
  pattern = a("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
  if isinstance(pattern, (list, tuple)):
    sliding = [bool(x) for x in pattern]
  else:
    sliding = [bool((i + 1) % int(pattern)) for i in range(layers)]
  big = layers == (46 if arch == "gemma2" else 62)
  out = {
      "sliding_window": a("attention.sliding_window"),
      "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
      "query_pre_attn_scalar": hidden // heads if big else head_dim,
      "final_logit_softcapping": a("final_logit_softcapping"),
  }
  if arch == "gemma2":
    out["attn_logit_softcapping"] = a("attn_logit_softcapping")
  else:
    out["rope_local_base_freq"] = float(a("rope.freq_base_swa", 10000.0))
  return out


def rope_factors(reader) -> np.ndarray:
  t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
  return dequantize(t).reshape(-1)


def llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int, path: str) -> dict:
  """The Llama 3.1 rope_parameters whose per-frequency divisors are `factors` (what llama.cpp writes as
  `rope_freqs`): factor = the largest divisor; low/high frequency factors and the original context are
  searched among common values and the fit is verified to 1e-5."""
  from jaxtele.models.attention import rope_inv_freq
  from jaxtele.models.config import ModelConfig

  factors = np.asarray(factors, np.float64)
  base = ModelConfig(head_dim=head_dim, rope_theta=theta)
  target = rope_inv_freq(base) / factors
  factor = float(np.round(factors.max(), 4))
  for ctx in [8192] + [2 ** k for k in range(4, 21)]:
    for lo, hi in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (0.5, 4.0)):
      rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
              "original_max_position_embeddings": ctx}
      got = rope_inv_freq(base.replace(rope_scaling=tuple(sorted(rope.items()))))
      if np.allclose(got, target, rtol=1e-5, atol=0):
        return rope | {"rope_theta": theta}
  raise JaxteleError(f"{path}: rope_freqs match no llama3 RoPE scaling (factor {factor}); "
                     "import the HF folder instead")


def _hf_name(name: str, arch: str, path: str) -> str:
  parts = name.split(".")
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
    module = LAYER_NAMES[parts[2]]
    if parts[2] == "ffn_norm" and arch in SANDWICH:  # llama.cpp's FFN_PRE_NORM shares the name
      module = "pre_feedforward_layernorm"
    return f"model.layers.{parts[1]}.{module}.{parts[3]}"
  if len(parts) == 2 and parts[0] in TOP_NAMES:
    return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
  raise JaxteleError(f"{path}: unexpected GGUF tensor {name!r}")


def dequantize(t) -> np.ndarray:
  import gguf

  w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
  return w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first


def build_tokenizer(meta: dict, source: str):
  """An HF fast tokenizer (special tokens and chat template included) from GGUF tokenizer metadata."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  kind = meta.get("tokenizer.ggml.model")
  if kind == "llama":
    return sentencepiece_tokenizer(meta)
  if kind != "gpt2":
    raise JaxteleError(f"{source}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' or "
                       "SentencePiece 'llama')")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise JaxteleError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  # A byte-level vocabulary with no merges (jaxtele's byte tokenizer) is written with an empty merge list,
  # which the GGUF writer leaves out.
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
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


def _special_kwargs(meta: dict, tokens: list) -> dict:
  def special(key):
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  return dict(bos_token=special("bos"), eos_token=special("eos"), unk_token=special("unknown"),
              pad_token=special("padding"), chat_template=meta.get("tokenizer.chat_template"))


def sentencepiece_tokenizer(meta: dict):
  """A SentencePiece-BPE vocabulary (`tokenizer.ggml.model == "llama"`: tokens and scores, no merges) as the HF
  Llama/Gemma tokenizer: merges are recovered from the vocabulary, best first. Llama orders them by score;
  Gemma's scores do not follow its merge order, its file order does, and its runs of spaces are stored as
  spaces where the HF vocabulary spells them with U+2581."""
  from tokenizers import AddedToken
  from transformers import GemmaTokenizer, LlamaTokenizer
  from transformers.tokenization_utils_base import generate_merges

  tokens = list(meta["tokenizer.ggml.tokens"])
  types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  gemma = str(meta.get("general.architecture", "")).startswith("gemma")
  if gemma:
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    scores = {t: -i for i, t in enumerate(tokens)}
  else:
    scores = dict(zip(tokens, meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))))
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = generate_merges(vocab, scores)
  cls = GemmaTokenizer if gemma else LlamaTokenizer
  tok = cls(vocab=vocab, merges=merges, **_special_kwargs(meta, tokens),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))
  control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
  if control:
    tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
  user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
  if user:
    tok.add_tokens(user)
  tok.model_max_length = 1 << 30
  return tok
