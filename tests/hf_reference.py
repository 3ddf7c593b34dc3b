"""Tiny randomly initialised `transformers` models: the outside reference for the decoder's numbers."""

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_untied": ("llama", dict(tie_word_embeddings=False)),
    "llama_bias": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=64))),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral_window": ("mistral", dict(sliding_window=8, tie_word_embeddings=False)),
    "gqa_kv1": ("llama", dict(num_key_value_heads=1)),
    "gqa_kv4": ("llama", dict(num_key_value_heads=4)),
}
CONFIG_CLASS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                "mistral": transformers.MistralConfig}


def make_hf_model(name: str, seed: int = 0, **overrides):
  family, extra = FAMILIES[name]
  cfg = CONFIG_CLASS[family](**(BASE | extra | overrides))
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  with torch.no_grad():  # Randomise everything, norms and zero-initialised biases included.
    for pname, p in model.named_parameters():
      p.normal_(1.0 if "norm" in pname else 0.0, 0.1 if "norm" in pname else 0.05)
  return model


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
