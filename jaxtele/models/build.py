"""From a run config to a model ready to train: load or initialise, add LoRA, split what trains."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import Decoder, init_model
from jaxtele.models.lora import add_lora, trainable_filter


def runtime(mcfg) -> dict:
  return {"param_dtype": mcfg.param_dtype, "dtype": mcfg.dtype, "remat": mcfg.remat}


def model_config(mcfg) -> ModelConfig:
  """The ModelConfig a run uses, without loading weights."""
  from jaxtele.convert import model_config as source_config

  if mcfg.source:
    return source_config(mcfg.source, **runtime(mcfg))
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in mcfg.init.to_dict().items() if k in fields}, **runtime(mcfg))


def load_tokenizer(mcfg):
  from jaxtele.convert import load_tokenizer as from_source
  from jaxtele.data.byte_tokenizer import byte_tokenizer

  if mcfg.tokenizer == "bytes":
    return byte_tokenizer()
  return from_source(mcfg.tokenizer or mcfg.source)


def build_model(cfg) -> Decoder:
  """The model of `cfg.model`, with LoRA leaves when `cfg.train.mode == 'lora'`."""
  from jaxtele.convert import load_pretrained

  mcfg = cfg.model
  if mcfg.source:
    model = load_pretrained(mcfg.source, **runtime(mcfg)).model
  else:
    model = init_model(model_config(mcfg), seed=cfg.seed)
  if cfg.train.mode == "lora":
    lc = cfg.lora
    add_lora(model, lc.rank, lc.alpha, lc.targets, seed=cfg.seed, rslora=lc.rslora)
  return model


def split_model(model: Decoder, cfg):
  """-> (graphdef, trainable params, frozen params) as pure dicts.

  Trainable leaves are fp32 master weights; the frozen base is stored in `lora.base_dtype`.
  """
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg.train.mode, cfg.lora.extra_trainable), ...)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(trainable))
  base_dtype = jnp.dtype(cfg.lora.base_dtype) if cfg.train.mode == "lora" else None
  frozen = jax.tree.map(lambda x: x.astype(base_dtype) if base_dtype else x, nnx.to_pure_dict(frozen))
  return graphdef, params, frozen
