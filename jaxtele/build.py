"""From a config to a model: load or initialise, add LoRA, split what trains; and back from a run's checkpoint.

The one place that joins `models` (the decoder) with `convert` (weights on disk): `models` imports neither.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtele import convert, source
from jaxtele.accelerator import resolve_base_dtype, resolve_dtype
from jaxtele.data.byte_tokenizer import byte_tokenizer
from jaxtele.errors import JaxteleError, config_keys
from jaxtele.models.adapters import VARIANTS
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import Decoder, init_model, model_attention
from jaxtele.models.lora import (EMBED, HEAD, QUANTIZERS, add_lora, check_extra, extra_pattern, merge_lora,
                                 quantize_base, trainable_filter)

# The model package names its arguments in errors; these are the config keys they come from.
LORA_KEYS = dict(rank="lora.rank", targets="lora.targets", variant="lora.variant", dropout="lora.dropout",
                 mode="train.mode", extra="lora.extra_trainable")


def runtime(mcfg) -> dict:
  """The runtime policy with `auto` dtypes resolved for this backend (accelerator.py)."""
  return {"param_dtype": mcfg.param_dtype, "dtype": resolve_dtype(mcfg.dtype), "remat": mcfg.remat,
          "attention": mcfg.attention, "scan_layers": mcfg.scan_layers}


def model_config(mcfg) -> ModelConfig:
  """The ModelConfig a run uses, without loading weights; `auto` dtype and attention are resolved here. Explicit
  attention names pass through (`config.validate` checks them before a step is built), so a run trained with
  `cudnn` still loads on a CPU."""
  if mcfg.source:
    cfg = source.model_config(model_source(mcfg), **runtime(mcfg))
  else:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in mcfg.init.to_dict().items() if k in fields}, **runtime(mcfg))
  return cfg.replace(attention=resolved_attention(cfg)) if cfg.attention == "auto" else cfg


def resolved_attention(cfg: ModelConfig, backend: str | None = None) -> str:
  """The implementation `cfg.attention` runs on this backend, decided once, before any trace; one that the
  backend cannot run is refused as `config: model.attention: ...`."""
  try:
    return model_attention(cfg, backend)
  except JaxteleError as e:
    raise JaxteleError(f"config: model.attention: {e}") from None


def model_source(mcfg) -> source.Source:
  return source.resolve(mcfg.source, flags=source.Flags("model.source", "model.step", "model.base"))


def load_tokenizer(mcfg):
  """`model.tokenizer` (a source, or `bytes`), else the tokenizer `model.source` comes with."""
  if mcfg.tokenizer == "bytes":
    return byte_tokenizer()
  if mcfg.tokenizer or not mcfg.source:
    return convert.load_tokenizer(mcfg.tokenizer)
  return source.tokenizer(model_source(mcfg))


def build_model(cfg, weights: bool = True) -> Decoder:
  """The model of `cfg.model`, with adapters when `cfg.train.mode == 'lora'`: new ones per `cfg.lora`, or the
  PEFT adapter folder `model.adapter` (to evaluate it or continue training it); `lora.quantize_base: nf4`
  stores the frozen linear kernels in NF4 (QLoRA). A full run given `model.adapter` starts from the merge.
  weights=False: the source's architecture, randomly initialised (for shapes)."""
  from jaxtele.convert.peft import load_adapter

  mcfg, lc = cfg.model, cfg.lora
  if mcfg.source and weights:
    model = source.model(model_source(mcfg), runtime(mcfg) | {"attention": model_config(mcfg).attention})
  else:
    model = init_model(model_config(mcfg), seed=cfg.seed)
  adapter_dir = mcfg.adapter
  quant = lc.quantize_base
  if quant not in QUANTIZERS:
    raise JaxteleError(f"lora.quantize_base: unknown {quant!r} (choose from {', '.join(QUANTIZERS)})")
  if cfg.train.mode != "lora":
    if quant != "none":
      raise JaxteleError("lora.quantize_base: a quantized base cannot be fully fine-tuned (train.mode=lora)")
    return merge_lora(load_adapter(model, adapter_dir)) if adapter_dir else model
  variant = lc.variant
  quantize = lambda: quant == "nf4" and quantize_base(model, double_quant=lc.double_quant)
  # A variant whose init reads the float base (PiSSA's SVD) quantizes the residual after it, as PEFT advises.
  after = variant in VARIANTS and VARIANTS[variant].quantize_after_init
  if not after:
    quantize()
  if adapter_dir:
    load_adapter(model, adapter_dir)
  else:
    with config_keys(**LORA_KEYS):
      add_lora(model, lc.rank, lc.alpha, lc.targets, seed=cfg.seed, rslora=lc.rslora, variant=variant,
               dropout=lc.dropout)
  if after:
    quantize()
  return model


def saved_modules(lora_cfg, tied: bool) -> list[str]:
  """The whole base modules a LoRA run trains by name (PEFT's `modules_to_save`). A tied head IS the
  embedding: asking for either trains that one tensor, never an untied copy."""
  out = []
  if lora_cfg.get("train_embeddings", False) or (tied and lora_cfg.get("train_head", False)):
    out.append(EMBED)
  if lora_cfg.get("train_head", False) and not tied:
    out.append(HEAD)
  return out


def lora_extra(lora_cfg, tied: bool) -> str:
  """The regex of base parameters a LoRA run trains: `lora.extra_trainable` and the saved modules."""
  return extra_pattern(lora_cfg.get("extra_trainable", ""), saved_modules(lora_cfg, tied))


def split_model(model: Decoder, cfg):
  """-> (graphdef, trainable params, frozen params) as pure dicts (of arrays, or of ShapeDtypeStructs for an
  abstract model).

  Trainable leaves are fp32 master weights; the frozen base's float Params are stored in `lora.base_dtype`
  (`auto`: the compute dtype on GPU/TPU, fp32 on CPU).
  Other frozen state (NF4 codes and scales, PiSSA's initial factors) keeps its dtype.
  """
  lora = cfg.train.mode == "lora"
  with config_keys(**LORA_KEYS):
    check_extra(model, cfg.lora.extra_trainable if lora else "")
    trains = trainable_filter(cfg.train.mode, lora_extra(cfg.lora, model.config.tie_word_embeddings) if lora else "")
  graphdef, trainable, frozen = nnx.split(model, trains, ...)
  base = resolve_base_dtype(cfg.lora.base_dtype, cfg.model.dtype)
  base_dtype = jnp.dtype(base) if cfg.train.mode == "lora" else None
  params = jax.tree.map(lambda x: cast(x, jnp.float32), nnx.to_pure_dict(trainable))

  def cast_base(var):
    if base_dtype and isinstance(var, nnx.Param) and jnp.issubdtype(var.value.dtype, jnp.floating):
      return var.replace(cast(var.value, base_dtype))
    return var

  frozen = jax.tree.map(cast_base, frozen, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, params, nnx.to_pure_dict(frozen)


def cast(x, dtype):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape, dtype)
  return x.astype(dtype)


def abstract_split(cfg):
  """split_model of the run's model with shapes only: no weights are loaded or allocated (dry runs, planning)."""
  return split_model(nnx.eval_shape(lambda: build_model(cfg, weights=False)), cfg)


def load_run(run_dir: str, step: int | None = None):
  """(config, graphdef, params, frozen, tokenizer) of a run's checkpoint (latest, or `step`); the base is
  reloaded from the run's `model.source` and must match the fingerprint the checkpoint recorded."""
  from jaxtele.checkpoint import Checkpointer, check_compatible, fingerprint
  from jaxtele.run import RunDir

  run = RunDir(run_dir)
  step = run.step(step)
  meta, cfg = run.meta(step), run.config(step)
  graphdef, params, frozen = split_model(build_model(cfg), cfg)
  if cfg.train.mode == "lora":
    check_compatible(meta, {**meta, "base_fingerprint": fingerprint(frozen)}, run.step_dir(step))
  with Checkpointer(run_dir, keep=1, async_save=False) as ckpt:
    params = ckpt.restore_params(step, params)
  return cfg, graphdef, params, frozen, load_tokenizer(cfg.model)
