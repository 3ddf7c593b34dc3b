"""From a config to a model: load or initialise, add LoRA, split what trains; and back from a run's checkpoint.

The one place that joins `models` (the decoder) with `convert` (weights on disk): `models` imports neither.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtele import convert
from jaxtele.data.byte_tokenizer import byte_tokenizer
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import Decoder, init_model
from jaxtele.models.lora import add_lora, trainable_filter


def runtime(mcfg) -> dict:
  return {"param_dtype": mcfg.param_dtype, "dtype": mcfg.dtype, "remat": mcfg.remat, "attention": mcfg.attention}


def model_config(mcfg) -> ModelConfig:
  """The ModelConfig a run uses, without loading weights."""
  if mcfg.source:
    return convert.model_config(mcfg.source, **runtime(mcfg))
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in mcfg.init.to_dict().items() if k in fields}, **runtime(mcfg))


def load_tokenizer(mcfg):
  if mcfg.tokenizer == "bytes":
    return byte_tokenizer()
  return convert.load_tokenizer(mcfg.tokenizer or mcfg.source)


def build_model(cfg) -> Decoder:
  """The model of `cfg.model`, with LoRA leaves when `cfg.train.mode == 'lora'`."""
  mcfg = cfg.model
  if mcfg.source:
    model = convert.load_pretrained(mcfg.source, **runtime(mcfg)).model
  else:
    model = init_model(model_config(mcfg), seed=cfg.seed)
  if cfg.train.mode == "lora":
    lc = cfg.lora
    add_lora(model, lc.rank, lc.alpha, lc.targets, seed=cfg.seed, rslora=lc.rslora)
  return model


def split_model(model: Decoder, cfg):
  """-> (graphdef, trainable params, frozen params) as pure dicts (of arrays, or of ShapeDtypeStructs for an
  abstract model).

  Trainable leaves are fp32 master weights; the frozen base is stored in `lora.base_dtype`.
  """
  graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg.train.mode, cfg.lora.extra_trainable), ...)
  base_dtype = jnp.dtype(cfg.lora.base_dtype) if cfg.train.mode == "lora" else None
  params = jax.tree.map(lambda x: cast(x, jnp.float32), nnx.to_pure_dict(trainable))
  frozen = jax.tree.map(lambda x: cast(x, base_dtype) if base_dtype else x, nnx.to_pure_dict(frozen))
  return graphdef, params, frozen


def cast(x, dtype):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, dtype)
  return x.astype(dtype)


def abstract_split(cfg):
  """split_model of the run's model with shapes only: nothing is loaded or allocated (dry runs, planning)."""
  def make():
    model = init_model(model_config(cfg.model), seed=cfg.seed)
    if cfg.train.mode == "lora":
      lc = cfg.lora
      add_lora(model, lc.rank, lc.alpha, lc.targets, seed=cfg.seed, rslora=lc.rslora)
    return model

  return split_model(nnx.eval_shape(make), cfg)


def load_run(run_dir: str, step: int | None = None):
  """(config, graphdef, params, frozen, tokenizer) of a run's checkpoint (latest, or `step`); the base is
  reloaded from the run's `model.source` and must match the fingerprint the checkpoint recorded."""
  import ml_collections

  from jaxtele.checkpoint import Checkpointer, check_compatible, fingerprint
  from jaxtele.errors import JaxteleError

  with Checkpointer(run_dir, keep=1, async_save=False) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise JaxteleError(f"{ckpt.directory}: no checkpoint")
    meta = ckpt.read_meta(step)
    cfg = ml_collections.ConfigDict(meta["config"])
    graphdef, params, frozen = split_model(build_model(cfg), cfg)
    if cfg.train.mode == "lora":
      check_compatible(meta, {**meta, "base_fingerprint": fingerprint(frozen)}, f"{ckpt.directory}/{step}")
    params = ckpt.restore_params(step, params, cfg)
  return cfg, graphdef, params, frozen, load_tokenizer(cfg.model)
