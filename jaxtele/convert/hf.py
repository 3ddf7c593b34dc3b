"""Hugging Face checkpoints in and out: `config.json` + safetensors (single or sharded) <-> Decoder.

The parameter tree uses HF's module names, so conversion is one rule per leaf kind:
`kernel` <-> `weight`.T, `embedding`/`scale` <-> `weight`, `bias` <-> `bias`, with `model.` in front
of everything but `lm_head`.
"""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxtele.errors import JaxteleError, read_json
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import Decoder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Buffers older HF checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_key(path: tuple) -> str:
  """('layers', 0, 'self_attn', 'q_proj', 'kernel') -> 'model.layers.0.self_attn.q_proj.weight'."""
  module = ".".join(str(p) for p in path[:-1])
  prefix = "" if path[0] == "lm_head" else "model."
  return f"{prefix}{module}.{HF_LEAF[path[-1]]}"


def to_hf_tensors(model: Decoder, dtype=None) -> dict[str, np.ndarray]:
  """HF-named numpy tensors of the model's base weights (LoRA leaves are not part of an HF model)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] not in HF_LEAF or isinstance(var, nnx.LoRAParam):
      continue
    x = np.asarray(var[...])
    if path[-1] == "kernel":
      x = x.T
    out[hf_key(path)] = np.ascontiguousarray(x.astype(dtype) if dtype else x)
  return out


def load_hf_tensors(model: Decoder, tensors: dict, source: str) -> Decoder:
  """Fill `model` (abstract or concrete) from HF-named arrays; every shape is checked against the config."""
  state = nnx.state(model, nnx.Param)
  flat = []
  used = set()
  for path, var in nnx.to_flat_state(state):
    key = hf_key(path)
    if key not in tensors:
      raise JaxteleError(f"{source}: missing tensor {key!r}")
    x = np.asarray(tensors[key])
    if path[-1] == "kernel":
      x = x.T
    if x.shape != tuple(var.shape):
      raise JaxteleError(f"{source}: tensor {key!r} has shape {list(np.shape(tensors[key]))}, "
                         f"the config needs {list(var.shape if path[-1] != 'kernel' else var.shape[::-1])}")
    used.add(key)
    flat.append((path, var.replace(jnp.asarray(x, dtype=var.dtype))))
  tied_head = model.config.tie_word_embeddings and "lm_head.weight" in tensors
  extra = [k for k in tensors if k not in used and not k.endswith(IGNORED_SUFFIXES) and not (tied_head and k == "lm_head.weight")]
  if extra:
    raise JaxteleError(f"{source}: {len(extra)} tensor(s) the config does not use, e.g. {extra[0]!r}")
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(folder, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise JaxteleError(f"{folder}: no model.safetensors or model.safetensors.index.json")
  tensors = {}
  for name in files:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      raise JaxteleError(f"{path}: shard listed in the index is missing")
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        tensors[k] = f.get_tensor(k)
  return tensors


def read_config(folder: str, **runtime) -> ModelConfig:
  path = os.path.join(folder, "config.json")
  return ModelConfig.from_hf(read_json(path, "missing (not a Hugging Face model folder)"), source=path, **runtime)


def resolve(source: str) -> str:
  """A local folder as is; otherwise a hub id, downloaded when online."""
  if os.path.isdir(source):
    return source
  if os.path.exists(source):
    raise JaxteleError(f"{source}: not a model folder")
  if source.count("/") != 1 or source.startswith((".", "/")):
    raise JaxteleError(f"{source}: no such model folder")
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.jinja"])
  except Exception as e:  # offline, private, or unknown id
    raise JaxteleError(f"{source}: not a local folder and the hub download failed ({type(e).__name__})") from None


def save_hf(model: Decoder, folder: str, *, tokenizer=None, tokenizer_dir=None, dtype=None,
            max_shard_bytes=2 * 1024**3):
  """Write an HF model folder: config, generation config, (sharded) safetensors, tokenizer files."""
  os.makedirs(folder, exist_ok=True)
  cfg = model.config
  np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype or cfg.param_dtype]
  tensors = to_hf_tensors(model, np_dtype)
  hf_cfg = cfg.to_hf() | {"torch_dtype": dtype or cfg.param_dtype}
  _write_json(os.path.join(folder, "config.json"), hf_cfg)
  gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg[k] is not None}
  _write_json(os.path.join(folder, "generation_config.json"), gen)
  _write_safetensors(tensors, folder, max_shard_bytes)
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)
  elif tokenizer_dir:
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(tokenizer_dir, name)):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)


def _write_safetensors(tensors, folder, max_shard_bytes):
  shards, size = [{}], 0
  for k, v in tensors.items():
    if size and size + v.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = v
    size += v.nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  total = sum(v.nbytes for v in tensors.values())
  _write_json(os.path.join(folder, "model.safetensors.index.json"),
              {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
