"""Run configuration: defaults, recipe files (`configs/*.py` with `get_config()`), `--config.key=value`
overrides parsed by `ml_collections.config_flags`, and one validation pass before anything heavy.

Every key has a rule (type and range, or a choice set) in `RULES`; every error is one line naming the key
(or the recipe's file:line) and what is allowed.
"""

import dataclasses
import math
import os
import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import FieldReference, config_flags

from jaxtele.data.packing import PACKINGS
from jaxtele.data.pipeline import FORMATS, default_config as data_defaults
from jaxtele.data.sft import TEMPLATES
from jaxtele.errors import JaxteleError
from jaxtele.models.attention import ATTENTION_IMPLS
from jaxtele.models.config import FAMILIES, REMAT_POLICIES, ModelConfig
from jaxtele.models.decoder import ACTIVATIONS
from jaxtele.models.adapters import VARIANTS
from jaxtele.models.lora import QUANTIZERS
from jaxtele.optimizer import DECAY_SHAPES, SCHEDULES
from jaxtele.token_clock import requested_tokens

DTYPES = ("float32", "bfloat16")
FILE_SOURCES = ("text", "jsonl", "json", "parquet")
PLATFORMS = ("any", "cpu", "gpu", "tpu")
LOSSES = ("plain", "chunked")


def default_config() -> ml_collections.ConfigDict:
  model_init = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in INIT_KEYS}
  for key, kind in OPTIONAL_INIT.items():  # typed, so an override of an unset value parses
    model_init[key] = FieldReference(None, field_type=kind)
  cfg = ml_collections.ConfigDict({
      "run_dir": "runs/default",
      "seed": 0,
      "model": {
          "source": "",  # HF folder, hub id, .gguf or jaxtele folder; empty: random init from model.init
          "tokenizer": "",  # empty: the source's; "bytes": the built-in byte tokenizer
          "init": model_init,
          "param_dtype": "float32",
          "dtype": "auto",  # auto: bf16 compute on GPU/TPU, fp32 on CPU (jaxtele/accelerator.py)
          "remat": "none",  # a policy name: see models/config.py REMAT_POLICIES
          "attention": "auto",  # auto: the fastest implementation the backend has (models/attention.py)
          "scan_layers": False,  # compile one body for repeating layers (models/scan.py); same tree and values
          "adapter": "",  # a PEFT adapter folder to load onto the base (evaluate it, or continue training it)
      },
      "data": data_defaults(),
      # every 0: only at the end; at_start: a baseline before the first step (what forgetting is measured against)
      "eval": {"every": 0, "at_start": False, "max_batches": 8, "batch_size": 8, "sets": (),
               # also evaluate once the run has seen >= each of these input token counts; log: (first, last, n)
               "at_tokens": (), "at_tokens_log": (),
               "forgetting_base": False},  # score each eval against the frozen base in bpb (frontier.py)
      "train": {"mode": "full", "steps": 100, "grad_accum": 1, "log_every": 10,
                "stop_at": 0,  # stop_at > 0: save and stop after that step; the schedule still spans `steps`
                "loss": "plain", "loss_chunk": 1024,  # chunked: the [B, T, V] logits are never all alive
                "forgetting_budget": 0.0, "on_budget": "continue"},  # 0.02: general bpb at most +2% over the base
      "lora": {"rank": 16, "alpha": 32.0, "targets": "all-linear", "rslora": False,
               "extra_trainable": "", "base_dtype": "auto",  # auto: the compute dtype on GPU/TPU, fp32 on CPU
               "variant": "lora",  # lora | dora | pissa (init from W's top singular directions)
               "dropout": 0.0,  # on the adapter input, training only
               "plus_ratio": 0.0,  # LoRA+: B's learning rate = ratio x A's (0 or 1: off)
               "quantize_base": "none", "double_quant": False,  # nf4: QLoRA
               # Whole embedding / head trained beside the adapters (PEFT modules_to_save; a tied pair is one
               # tensor); embedding_lr > 0: their peak learning rate (same schedule shape), 0: optimizer.lr.
               "train_embeddings": False, "train_head": False, "embedding_lr": 0.0},
      "optimizer": {"lr": 1e-4, "schedule": "cosine", "warmup_ratio": 0.03, "final_lr_ratio": 0.1,
                    "weight_decay": 0.01, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip": 1.0,
                    "decay_fraction": 0.2, "decay_shape": "sqrt"},  # wsd: the final decay's share and shape
      # Axis sizes (-1: the rest of the devices); require: refuse to run on another platform.
      "mesh": {"data": -1, "fsdp": 1, "tensor": 1, "require": "any"},
      "checkpoint": {"every": 100, "keep": 3, "async_save": True, "resume": True},
      "export": {"hf": False, "adapter": False, "merged": False, "dtype": FieldReference(None, field_type=str),
                 "verify": True},  # the export certificate (convert/certify.py)
      # Weights & Biases beside metrics.jsonl (same keys): an empty project turns it off; offline needs no network.
      "metrics": {"wandb": {"project": "", "name": "", "entity": "", "mode": "offline"}},
  })
  cfg.lock()  # recipes and overrides may change values, never add keys: a typo fails loudly
  return cfg


# --- Rules: one per key. ---

@dataclasses.dataclass(frozen=True)
class Rule:
  kind: type | tuple
  lo: float | None = None  # inclusive unless lo_open
  hi: float | None = None  # inclusive unless hi_open
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple = ()
  optional: bool = False  # None allowed

  def check(self, key: str, value):
    if value is None:
      if not self.optional:
        raise JaxteleError(f"config: {key}: must be set")
      return
    kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
      names = " or ".join(k.__name__ for k in kinds)
      raise JaxteleError(f"config: {key}: expected {names}, got {value!r}")
    if self.choices and value not in self.choices:
      raise JaxteleError(f"config: {key}: {value!r} is not one of {', '.join(map(str, self.choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      if isinstance(value, float) and not math.isfinite(value):
        raise JaxteleError(f"config: {key}: must be finite, got {value}")
      if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
        raise JaxteleError(f"config: {key}: must be {'>' if self.lo_open else '>='} {self.lo}, got {value}{self.span()}")
      if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
        raise JaxteleError(f"config: {key}: must be {'<' if self.hi_open else '<='} {self.hi}, got {value}{self.span()}")

  def span(self) -> str:
    if self.lo is None or self.hi is None:
      return ""
    return f" (allowed: {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'})"


def choice(*values):
  return Rule(str, choices=values)


POSITIVE, NONNEG, STR, BOOL = Rule(int, lo=1), Rule(int, lo=0), Rule(str), Rule(bool)
UNIT_OPEN = Rule(float, lo=0.0, hi=1.0, hi_open=True)  # [0, 1)
INIT_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
             "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
             "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "hidden_act", "norm_offset", "embed_scale",
             "sandwich_norms", "qk_norm", "layer_types")
OPTIONAL_INIT = {"sliding_window": int, "query_pre_attn_scalar": float, "attn_softcap": float,
                 "final_softcap": float, "rope_local_theta": float}
POSITIVE_OR_UNSET = Rule(float, lo=0.0, lo_open=True, optional=True)

RULES = {
    "run_dir": Rule(str), "seed": NONNEG,
    "model.source": STR, "model.tokenizer": STR, "model.param_dtype": choice(*DTYPES),
    "model.dtype": choice(*DTYPES, "auto"), "model.remat": choice(*REMAT_POLICIES),
    "model.attention": choice(*ATTENTION_IMPLS), "model.adapter": STR, "model.scan_layers": BOOL,
    "model.init.model_type": choice(*FAMILIES), "model.init.vocab_size": POSITIVE,
    "model.init.hidden_size": POSITIVE, "model.init.intermediate_size": POSITIVE, "model.init.num_layers": POSITIVE,
    "model.init.num_heads": POSITIVE, "model.init.num_kv_heads": POSITIVE, "model.init.head_dim": Rule(int, lo=2),
    "model.init.rms_norm_eps": Rule(float, lo=0.0, lo_open=True), "model.init.rope_theta": Rule(float, lo=0.0, lo_open=True),
    "model.init.max_position_embeddings": POSITIVE, "model.init.tie_word_embeddings": BOOL,
    "model.init.qkv_bias": BOOL, "model.init.o_bias": BOOL, "model.init.mlp_bias": BOOL,
    "model.init.hidden_act": choice(*ACTIVATIONS), "model.init.norm_offset": Rule(float),
    "model.init.embed_scale": BOOL, "model.init.sandwich_norms": BOOL, "model.init.qk_norm": BOOL,
    "model.init.layer_types": Rule(tuple), "model.init.sliding_window": Rule(int, lo=1, optional=True),
    "model.init.query_pre_attn_scalar": POSITIVE_OR_UNSET, "model.init.attn_softcap": POSITIVE_OR_UNSET,
    "model.init.final_softcap": POSITIVE_OR_UNSET, "model.init.rope_local_theta": POSITIVE_OR_UNSET,
    "data.sources": Rule(tuple), "data.format": choice(*FORMATS), "data.sft_template": choice(*TEMPLATES),
    "data.doc_end_token": Rule(str, optional=True), "data.seq_len": Rule(int, lo=2), "data.batch_size": POSITIVE,
    "data.packing": choice(*PACKINGS), "data.num_packing_bins": POSITIVE, "data.shuffle": BOOL, "data.seed": NONNEG,
    "data.num_epochs": Rule(int, lo=1, optional=True), "data.workers": NONNEG,
    "data.split_before_shuffle": BOOL,
    "eval.every": NONNEG, "eval.at_start": BOOL, "eval.max_batches": NONNEG, "eval.batch_size": POSITIVE,
    "eval.sets": Rule(tuple), "eval.at_tokens": Rule(tuple), "eval.at_tokens_log": Rule(tuple),
    "eval.forgetting_base": BOOL,
    "train.forgetting_budget": Rule(float, lo=0.0), "train.on_budget": choice("continue", "stop"),
    "export.verify": BOOL,
    "train.mode": choice("full", "lora"), "train.steps": POSITIVE, "train.grad_accum": POSITIVE,
    "train.log_every": POSITIVE, "train.stop_at": NONNEG, "train.loss": choice(*LOSSES), "train.loss_chunk": POSITIVE,
    "lora.rank": POSITIVE, "lora.alpha": Rule(float, lo=0.0, lo_open=True), "lora.targets": STR, "lora.rslora": BOOL,
    "lora.extra_trainable": STR, "lora.base_dtype": choice(*DTYPES, "auto"),
    "lora.variant": Rule(str, choices=VARIANTS.keys()),  # a live view: a variant registered later is a choice too
    "lora.dropout": Rule(float, lo=0.0, hi=1.0, hi_open=True), "lora.plus_ratio": Rule(float, lo=0.0),
    "lora.quantize_base": choice(*QUANTIZERS), "lora.double_quant": BOOL,
    "lora.train_embeddings": BOOL, "lora.train_head": BOOL, "lora.embedding_lr": Rule(float, lo=0.0),
    "optimizer.lr": Rule(float, lo=0.0, lo_open=True), "optimizer.schedule": choice(*SCHEDULES),
    "optimizer.warmup_ratio": UNIT_OPEN, "optimizer.final_lr_ratio": Rule(float, lo=0.0, hi=1.0),
    "optimizer.weight_decay": Rule(float, lo=0.0), "optimizer.b1": UNIT_OPEN, "optimizer.b2": UNIT_OPEN,
    "optimizer.eps": Rule(float, lo=0.0, lo_open=True), "optimizer.clip": Rule(float, lo=0.0),
    "optimizer.decay_fraction": Rule(float, lo=0.0, hi=1.0), "optimizer.decay_shape": choice(*DECAY_SHAPES),
    "mesh.data": Rule(int, lo=-1), "mesh.fsdp": Rule(int, lo=-1), "mesh.tensor": Rule(int, lo=-1),
    "mesh.require": choice(*PLATFORMS),
    "checkpoint.every": POSITIVE, "checkpoint.keep": POSITIVE, "checkpoint.async_save": BOOL, "checkpoint.resume": BOOL,
    "metrics.wandb.project": STR, "metrics.wandb.name": STR, "metrics.wandb.entity": STR,
    "metrics.wandb.mode": choice("offline", "online", "disabled"),
    "export.hf": BOOL, "export.adapter": BOOL, "export.merged": BOOL,
    "export.dtype": Rule(str, choices=("float32", "bfloat16", "float16"), optional=True),
}


def leaves(cfg, prefix="") -> dict:
  """{dotted key: value} for every leaf of a ConfigDict."""
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out |= leaves(v, key + ".")
    else:
      out[key] = v
  return out


def check_rules(cfg):
  """Every key against its rule: type, range or choices. A key without a rule is a bug, not a pass."""
  for key, value in leaves(cfg).items():
    if key not in RULES:
      raise JaxteleError(f"config: {key}: no validation rule for this key")
    RULES[key].check(key, value)
  for key in ("mesh.data", "mesh.fsdp", "mesh.tensor"):
    if cfg.mesh[key.split(".")[1]] == 0:
      raise JaxteleError(f"config: {key}: must be -1 (the rest of the devices) or >= 1, got 0")


# --- Loading: config_flags parses the recipe and the overrides. ---

def load_config(path: str, overrides=(), check=None) -> ml_collections.ConfigDict:
  """A recipe file (`path`, or `path:arg` for `get_config(arg)`) plus `--config.a.b=value` overrides, then
  `check` (default: the training config's `RULES`; other configs, e.g. evaluation's, bring their own)."""
  if not os.path.isfile(path.split(":", 1)[0]):
    raise JaxteleError(f"--config: no such config file {path}")
  base = _parse(path, [])
  for item in overrides:
    key, sep, _ = item.removeprefix("--config.").partition("=")
    if not item.startswith("--config.") or not sep:
      raise JaxteleError(f"unknown argument {item!r} (usage: --config FILE [--config.key=value ...])")
    _check_key(base, key)
  cfg = _parse(path, list(overrides)) if overrides else base
  (check or check_rules)(cfg)
  return cfg


def _parse(path: str, overrides: list):
  argv = ["jaxtele", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
    return holder.value
  except flags.IllegalFlagValueError as e:  # "flag --config.a.b=v: why"
    flag, _, why = str(e).partition(": ")
    key, _, raw = flag.removeprefix("flag --config.").partition("=")
    raise JaxteleError(f"config: {key}: cannot parse {raw!r} ({why.splitlines()[0]})") from None
  except Exception as e:  # an error raised while executing the recipe: name its file and line
    raise JaxteleError(_recipe_error(path, e)) from None


def _recipe_error(path: str, e: BaseException) -> str:
  if isinstance(e, SyntaxError) and e.lineno:
    return f"{path}:{e.lineno}: syntax error: {e.msg}"
  cause = e
  while cause.__cause__ or cause.__context__:  # config_flags re-raises; find the recipe's own error
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, SyntaxError) and cause.lineno:
    return f"{os.path.basename(cause.filename or path)}:{cause.lineno}: syntax error: {cause.msg}"
  frames = [f for f in traceback.extract_tb(cause.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
  where = f"{path}:{frames[-1].lineno}" if frames else path
  what = f"unknown key {str(cause).strip(chr(34) + chr(39))!r}" if isinstance(cause, AttributeError) else \
      f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
  return f"{where}: {what}"


def _check_key(cfg, dotted: str):
  node = cfg
  for p in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise JaxteleError(f"config: unknown key {dotted!r}")
    node = node[p]


def from_argv(argv) -> ml_collections.ConfigDict:
  """`--config FILE [--config.key=value ...]` (the CLI's arguments) -> a checked config."""
  path, overrides = None, []
  args = iter(argv)
  for a in args:
    if a == "--config":
      path = next(args, None)
    elif a.startswith("--config="):
      path = a.split("=", 1)[1]
    else:
      overrides.append(a)
  if not path:
    raise JaxteleError("--config: required (e.g. --config configs/quickstart.py)")
  return load_config(path, overrides)


# --- Checks that need the model, the devices or the file system. ---

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
  """Checks across keys, against the model config and the device count; each error names its key."""
  check_rules(cfg)
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
  if cfg.model.init.num_heads % cfg.model.init.num_kv_heads and not cfg.model.source:
    raise JaxteleError(f"config: model.init.num_kv_heads: {cfg.model.init.num_kv_heads} does not divide "
                       f"model.init.num_heads ({cfg.model.init.num_heads})")
  if cfg.optimizer.schedule == "wsd" and cfg.optimizer.warmup_ratio + cfg.optimizer.decay_fraction > 1:
    raise JaxteleError(f"config: optimizer.decay_fraction: {cfg.optimizer.decay_fraction} + optimizer.warmup_ratio "
                       f"({cfg.optimizer.warmup_ratio}) exceed 1 (the run has no room for its warmup and decay)")
  requested_tokens(cfg.eval)
  check_forgetting(cfg)
  if cfg.train.stop_at > cfg.train.steps:
    raise JaxteleError(f"config: train.stop_at: {cfg.train.stop_at} is past train.steps ({cfg.train.steps})")


def check_forgetting(cfg):
  from jaxtele.frontier import ROLES, role

  for i, spec in enumerate(cfg.eval.sets):
    if spec.get("role", "domain") not in ROLES:
      raise JaxteleError(f"config: eval.sets[{i}].role: {spec['role']!r} is not one of {', '.join(ROLES)}")
  roles = {role(spec) for spec in cfg.eval.sets}
  if cfg.eval.forgetting_base and roles != set(ROLES):
    raise JaxteleError("config: eval.forgetting_base: needs a domain and a general eval set (eval.sets[i].role), "
                       f"has {', '.join(sorted(roles)) or 'none'}")
  if cfg.train.forgetting_budget > 0 and not cfg.eval.forgetting_base:
    raise JaxteleError("config: train.forgetting_budget: needs eval.forgetting_base=True")


def print_config(cfg, file=None):
  for key, value in leaves(cfg).items():
    print(f"  {key} = {value!r}", file=file or sys.stderr)
