"""A model source: what `--model`, `--source`, `--base`, `model.source` and `forgetting.base` may name, and how
each kind loads. Every CLI resolves its source here, so every CLI accepts every kind.

Kinds, in the order a path is recognised:
  gguf     a `.gguf` file (llama.cpp)
  peft     a folder with adapter_config.json, on its base (`base`, default: the adapter's base_model_name_or_path)
  run      a run directory with a complete checkpoint (the latest, or `step`)
  jaxtele  a folder with config.json and params/ (`export --format jaxtele`)
  hf       a folder with config.json and safetensors
  hub      `owner/name` that is no local path (downloaded when online)
`resolve` only looks at the file system; `load` reads weights. As a plain model (`model`), a PEFT source is its
base with the adapter merged and a run its checkpoint's model with the adapters merged.
"""

import dataclasses
import os

from jaxtele.errors import JaxteleError
from jaxtele.run import RunDir

KINDS = ("gguf", "peft", "run", "jaxtele", "hf", "hub")
ADAPTER_CONFIG = "adapter_config.json"
PRETRAINED = ("gguf", "jaxtele", "hf", "hub")  # what convert.load_pretrained reads


@dataclasses.dataclass(frozen=True)
class Flags:
  """The names a CLI or config gives the source, its step and its base: errors speak the caller's words."""
  source: str = "--source"
  step: str = "--step"
  base: str = "--base"


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str
  path: str
  step: int | None = None  # run directories: None is the latest
  base: str | None = None  # PEFT adapters: the base model's source


@dataclasses.dataclass
class Loaded:
  source: str  # the resolved path (a hub id's download folder)
  kind: str
  model: object
  tokenizer: object
  graphdef: object
  params: dict
  frozen: dict
  run_cfg: object = None  # a run's config (run directories only), brought up to date
  step: int | None = None
  base: str = ""  # PEFT adapters: the base they were loaded on


def resolve(source: str, step: int | None = None, base: str | None = None, flags: Flags = Flags()) -> Source:
  """The kind of `source`, from the file system alone; one line naming what is missing when it is no kind."""
  if not source:
    raise JaxteleError(f"{flags.source}: no model source given")
  if source.endswith(".gguf"):
    if not os.path.isfile(source):
      raise JaxteleError(f"{source}: no such GGUF file")
    kind = "gguf"
  elif os.path.isdir(source):
    kind = folder_kind(source)
  elif os.path.exists(source):
    raise JaxteleError(f"{source}: not a model folder")
  elif source.count("/") == 1 and not source.startswith((".", "/")):
    kind = "hub"
  else:
    raise JaxteleError(f"{source}: no such model folder")
  if step is not None and kind != "run":
    raise JaxteleError(f"{flags.step}: only for a run directory ({source} is a {kind} source)")
  if base and kind != "peft":
    raise JaxteleError(f"{flags.base}: only for a PEFT adapter source (a folder with {ADAPTER_CONFIG})")
  if kind == "run":
    step = RunDir(source).step(step)
  if kind == "peft":
    base = base or adapter_base(source, flags)
  return Source(kind, source, step, base)


def folder_kind(folder: str) -> str:
  if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
    return "peft"
  run = RunDir(folder)
  if run.steps():
    return "run"
  if os.path.isdir(os.path.join(folder, "params")) and os.path.isfile(os.path.join(folder, "config.json")):
    return "jaxtele"
  if os.path.isfile(os.path.join(folder, "config.json")):
    return "hf"
  checkpoints = "checkpoints/ holds no complete step" if run.is_run() else "no checkpoints/"
  raise JaxteleError(f"{folder}: not a model source: no {ADAPTER_CONFIG} (a PEFT adapter), {checkpoints} (a run "
                     "directory), no config.json (an HF or jaxtele folder)")


def adapter_base(folder: str, flags: Flags) -> str:
  from jaxtele.convert.peft import read_config

  base = read_config(folder).get("base_model_name_or_path") or ""
  if not base:
    raise JaxteleError(f"{folder}: the adapter names no base model; pass {flags.base}")
  return base


def load(src: Source, runtime: dict | None = None, flags: Flags = Flags()) -> Loaded:
  """The model of a resolved source, split into (graphdef, params, frozen); a run's split is its trainer's.
  `runtime` ({param_dtype, dtype, ...}) applies to pretrained weights; a run keeps its own."""
  from flax import nnx

  if src.kind == "run":
    from jaxtele.build import load_run

    cfg, graphdef, params, frozen, tokenizer = load_run(src.path, src.step)
    return Loaded(src.path, "run", nnx.merge(graphdef, params, frozen), tokenizer, graphdef, params, frozen, cfg,
                  src.step)
  if src.kind == "peft":
    from jaxtele.convert.peft import load_adapter

    base = resolve(src.base, flags=dataclasses.replace(flags, source=flags.base))
    if base.kind not in PRETRAINED:
      raise JaxteleError(f"{flags.base}: {src.base} is a {base.kind} source; a PEFT adapter's base is an HF folder, "
                         "hub id, jaxtele folder or .gguf")
    pre = pretrained(base, runtime)
    model, tokenizer, path = load_adapter(pre.model, src.path), pre.tokenizer, src.path
  else:
    pre = pretrained(src, runtime)
    model, tokenizer, path = pre.model, pre.tokenizer, pre.source
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  return Loaded(path, src.kind, model, tokenizer, graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen),
                base=src.base or "")


def pretrained(src: Source, runtime: dict | None = None):
  from jaxtele import convert

  return convert.load_pretrained(src.path, **(runtime or {}))


def model(src: Source, runtime: dict | None = None):
  """The source as a plain model: adapters (a PEFT folder's, a LoRA run's) merged into the kernels."""
  from jaxtele.models.lora import merge_lora

  if src.kind in PRETRAINED:
    return pretrained(src, runtime).model
  return merge_lora(load(src, runtime).model, dequantize=True)


def model_config(src: Source, **runtime):
  """The ModelConfig of a source without loading weights (a PEFT adapter's is its base's)."""
  from jaxtele import convert

  if src.kind == "run":
    from jaxtele.build import model_config as run_model_config

    return run_model_config(RunDir(src.path).config(src.step).model).replace(**runtime)
  return convert.model_config(src.base if src.kind == "peft" else src.path, **runtime)


def tokenizer(src: Source):
  """The tokenizer a source comes with (a PEFT adapter's base's, a run's own), without loading weights."""
  from jaxtele import convert

  if src.kind == "run":
    from jaxtele.build import load_tokenizer

    return load_tokenizer(RunDir(src.path).config(src.step).model)
  return convert.load_tokenizer(src.base if src.kind == "peft" else src.path)
