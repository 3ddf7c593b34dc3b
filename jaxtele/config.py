"""Run configuration: ml_collections defaults, recipe files (`configs/*.py` with `get_config()`),
`--config.key=value` overrides, and validation that runs before anything heavy.

Every error is one line naming the key.
"""

import ast
import dataclasses
import importlib.util
import os

import ml_collections
from ml_collections import FieldReference

from jaxtele.data.pipeline import default_config as data_defaults
from jaxtele.errors import JaxteleError
from jaxtele.models.config import ModelConfig


def default_config() -> ml_collections.ConfigDict:
  model_init = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.name not in ("param_dtype", "dtype", "remat", "rope_scaling", "sliding_window",
                                  "bos_token_id", "eos_token_id", "pad_token_id")}
  cfg = ml_collections.ConfigDict({
      "run_dir": "runs/default",
      "seed": 0,
      "model": {
          "source": "",  # HF folder, hub id or .gguf; empty: random init from model.init
          "tokenizer": "",  # empty: the source's; "bytes": the built-in byte tokenizer
          "init": model_init,
          "param_dtype": "float32",
          "dtype": "float32",
          "remat": False,
      },
      "data": data_defaults(),
      # every 0: only at the end; at_start: a baseline before the first step (what forgetting is measured against)
      "eval": {"every": 0, "at_start": False, "max_batches": 8, "batch_size": 8, "sets": []},
      "train": {"mode": "full", "steps": 100, "grad_accum": 1, "log_every": 10,
                "stop_at": 0},  # stop_at > 0: save and stop after that step; the schedule still spans `steps`
      "lora": {"rank": 16, "alpha": 32.0, "targets": "all-linear", "rslora": False,
               "extra_trainable": "", "base_dtype": "float32"},
      "optimizer": {"lr": 1e-4, "schedule": "cosine", "warmup_ratio": 0.03, "final_lr_ratio": 0.1,
                    "weight_decay": 0.01, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip": 1.0},
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
      "checkpoint": {"every": 100, "keep": 3, "async_save": True, "resume": True},
      "export": {"hf": False, "adapter": False, "merged": False, "dtype": FieldReference(None, field_type=str)},
  })
  cfg.lock()  # recipes and overrides may change values, never add keys: a typo fails loudly
  return cfg


def load_config(path: str, overrides=()) -> ml_collections.ConfigDict:
  """Load a recipe file and apply `--config.a.b=value` overrides; unknown keys and bad types are refused."""
  if not os.path.isfile(path):
    raise JaxteleError(f"--config: no such config file {path}")
  spec = importlib.util.spec_from_file_location("jaxtele_recipe", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    cfg = module.get_config()
  except AttributeError as e:  # ConfigDict refuses new keys on a locked config: a typo in the recipe
    raise JaxteleError(f"{path}: {e}") from None
  for item in overrides:
    apply_override(cfg, item)
  return cfg


def set_key(cfg, dotted: str, value):
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise JaxteleError(f"config: unknown key {dotted!r}")
    node = node[p]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise JaxteleError(f"config: unknown key {dotted!r}")
  if isinstance(node[leaf], ml_collections.ConfigDict) and isinstance(value, dict):
    for k, v in value.items():
      set_key(cfg, f"{dotted}.{k}", v)
    return
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise JaxteleError(f"config: {dotted}: {str(e).splitlines()[0]}") from None


def apply_override(cfg, item: str):
  """'--config.optimizer.lr=3e-4' (or 'optimizer.lr=3e-4')."""
  key, sep, raw = item.removeprefix("--").removeprefix("config.").partition("=")
  if not sep:
    raise JaxteleError(f"override {item!r}: expected --config.key=value")
  current = _get(cfg, key)
  set_key(cfg, key, parse_value(raw, current, key))


def _get(cfg, dotted):
  node = cfg
  for p in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise JaxteleError(f"config: unknown key {dotted!r}")
    node = node[p]
  return node


def parse_value(raw: str, current, key: str):
  """Parse an override by the type of the value it replaces."""
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise JaxteleError(f"config: {key}: expected true/false, got {raw!r}")
    return raw.lower() in ("true", "1")
  if isinstance(current, str) and not raw.startswith(("[", "(")):
    return raw
  if raw.lower() in ("none", "null"):
    return None
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if current is None or isinstance(current, str):
      return raw
    raise JaxteleError(f"config: {key}: cannot parse {raw!r} as {type(current).__name__}") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if current is not None and not isinstance(current, (list, tuple, str)) and type(value) is not type(current):
    raise JaxteleError(f"config: {key}: expected {type(current).__name__}, got {raw!r}")
  return value


DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant")
FILE_SOURCES = ("text", "jsonl", "json", "parquet")


def check_paths(cfg):
  """Data and model paths, before anything is loaded."""
  src = cfg.model.source
  looks_like_hub_id = src.count("/") == 1 and not src.startswith((".", "/")) and not src.endswith(".gguf")
  if src and not os.path.exists(src) and not looks_like_hub_id:
    raise JaxteleError(f"model.source: no such model file or folder {src}")
  if not src and not cfg.model.tokenizer:
    raise JaxteleError("model.tokenizer: a randomly initialised model needs a tokenizer (a model path or 'bytes')")
  sets = [("data.sources", cfg.data.sources)] + [(f"eval.sets[{i}].sources", s["sources"])
                                                  for i, s in enumerate(cfg.eval.sets)]
  for where, sources in sets:
    for j, spec in enumerate(sources):
      path = spec.get("path")
      if spec.get("type") in FILE_SOURCES + ("tfds",) and path and not os.path.exists(path):
        raise JaxteleError(f"{where}[{j}].path: no such file or folder {path}")


def validate(cfg, model_cfg: ModelConfig, n_devices: int, n_processes: int = 1):
  """Semantic checks that need the model config and the device count; each error names its key."""
  choices = {"train.mode": ("full", "lora"), "optimizer.schedule": SCHEDULES, "model.dtype": DTYPES,
             "model.param_dtype": DTYPES, "lora.base_dtype": DTYPES}
  for key, allowed in choices.items():
    value = _get(cfg, key)
    if value not in allowed:
      raise JaxteleError(f"config: {key}: {value!r} is not one of {', '.join(allowed)}")
  for key in ("train.steps", "train.grad_accum", "train.log_every", "checkpoint.every", "checkpoint.keep",
              "data.seq_len", "data.batch_size"):
    if _get(cfg, key) <= 0:
      raise JaxteleError(f"config: {key}: must be positive, got {_get(cfg, key)}")
  from jaxtele.sharding import mesh_shape

  shape = mesh_shape(cfg.mesh, n_devices)
  shards = shape["data"] * shape["fsdp"]
  accum = cfg.train.grad_accum
  if cfg.data.batch_size % (accum * shards):
    raise JaxteleError(f"config: data.batch_size: {cfg.data.batch_size} is not divisible by train.grad_accum "
                       f"({accum}) x the mesh's batch shards (data x fsdp = {shards})")
  if cfg.eval.sets and cfg.eval.batch_size % shards:
    raise JaxteleError(f"config: eval.batch_size: {cfg.eval.batch_size} is not divisible by the mesh's batch "
                       f"shards (data x fsdp = {shards})")
  if cfg.eval.sets and n_processes > 1 and cfg.eval.max_batches <= 0:
    raise JaxteleError("config: eval.max_batches: must be > 0 with several processes (they step in lockstep)")
  if cfg.data.seq_len > model_cfg.max_position_embeddings:
    raise JaxteleError(f"config: data.seq_len: {cfg.data.seq_len} exceeds the model's max_position_embeddings "
                       f"({model_cfg.max_position_embeddings})")
  if not 0 <= cfg.optimizer.warmup_ratio < 1:
    raise JaxteleError(f"config: optimizer.warmup_ratio: must be in [0, 1), got {cfg.optimizer.warmup_ratio}")
