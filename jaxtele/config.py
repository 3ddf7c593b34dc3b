"""Run configuration: defaults, recipe files (`configs/*.py` with `get_config()`), `--config.key=value`
overrides parsed by `ml_collections.config_flags`, and one validation pass before anything heavy.

Every key is declared once, with its default and its rule (type and range, or a choice set; jaxtele/schema.py);
every error is one line naming the key (or the recipe's file:line) and what is allowed. Choice sets come from
the modules that implement them.
"""

import dataclasses
import os
import sys
import traceback

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxtele import schema
from jaxtele.accelerator import ACCELERATORS, DTYPES, PLATFORMS
from jaxtele.data.pipeline import schema as data_schema
from jaxtele.data.sources import SOURCES
from jaxtele.errors import JaxteleError
from jaxtele.export import DTYPES as EXPORT_DTYPES
from jaxtele.loss import LOSSES
from jaxtele.models.attention import ATTENTION_IMPLS
from jaxtele.models.config import FAMILIES, ModelConfig
from jaxtele.models.decoder import HOST_OFFLOAD_REMAT, REMAT_POLICIES
from jaxtele.models.layers import ACTIVATIONS
from jaxtele.models.adapters import VARIANTS
from jaxtele.models.lora import QUANTIZERS
from jaxtele.optimizer import DECAY_SHAPES, SCHEDULES
from jaxtele.schema import BOOL, NONNEG, POSITIVE, POSITIVE_FLOAT, STR, TUPLE, UNIT_OPEN, Rule, choice, leaves
from jaxtele.token_clock import requested_tokens

OPTIONAL_POSITIVE = Rule(float, lo=0.0, lo_open=True, optional=True)
# model.init: ModelConfig's architecture fields (their defaults are ModelConfig's), each with its rule.
INIT_RULES = {
    "model_type": choice(*FAMILIES), "vocab_size": POSITIVE, "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
    "num_layers": POSITIVE, "num_heads": POSITIVE, "num_kv_heads": POSITIVE, "head_dim": Rule(int, lo=2),
    "rms_norm_eps": POSITIVE_FLOAT, "rope_theta": POSITIVE_FLOAT, "max_position_embeddings": POSITIVE,
    "tie_word_embeddings": BOOL, "qkv_bias": BOOL, "o_bias": BOOL, "mlp_bias": BOOL,
    "hidden_act": choice(*ACTIVATIONS), "norm_offset": Rule(float), "embed_scale": BOOL, "sandwich_norms": BOOL,
    "qk_norm": BOOL, "layer_types": TUPLE, "sliding_window": Rule(int, lo=1, optional=True),
    "query_pre_attn_scalar": OPTIONAL_POSITIVE, "attn_softcap": OPTIONAL_POSITIVE, "final_softcap": OPTIONAL_POSITIVE,
    "rope_local_theta": OPTIONAL_POSITIVE,
}


def _model_init() -> dict:
  model = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  return {key: rule(model[key]) for key, rule in INIT_RULES.items()}


def train_schema() -> dict:
  """Every training key: `rule(default)`."""
  return {
      "run_dir": STR("runs/default"),
      "seed": NONNEG(0),
      "model": {
          # HF folder, hub id, .gguf or jaxtele folder; empty: random init from model.init
          "source": STR(""),
          "tokenizer": STR(""),  # empty: the source's; "bytes": the built-in byte tokenizer
          "init": _model_init(),
          "param_dtype": choice(*DTYPES)("float32"),
          "dtype": choice(*DTYPES, "auto")("auto"),  # auto: bf16 compute on GPU/TPU, fp32 on CPU (accelerator.py)
          "remat": choice(*REMAT_POLICIES)("none"),  # what a layer keeps for the backward pass (models/decoder.py)
          "attention": choice(*ATTENTION_IMPLS)("auto"),  # auto: the fastest the backend has (models/attention.py)
          "scan_layers": BOOL(False),  # compile one body for repeating layers (models/scan.py); same tree and values
          "adapter": STR(""),  # a PEFT adapter folder to load onto the base (evaluate it, or continue training it)
      },
      "data": data_schema(),
      # every 0: only at the end; at_start: a baseline before the first step (what forgetting is measured against)
      "eval": {"every": NONNEG(0), "at_start": BOOL(False), "max_batches": NONNEG(8), "batch_size": POSITIVE(8),
               "sets": TUPLE(()),
               # also evaluate once the run has seen >= each of these input token counts; log: (first, last, n)
               "at_tokens": TUPLE(()), "at_tokens_log": TUPLE(()),
               "forgetting_base": BOOL(False)},  # score each eval against the frozen base in bpb (frontier.py)
      "train": {"mode": choice("full", "lora")("full"), "steps": POSITIVE(100), "grad_accum": POSITIVE(1),
                "log_every": POSITIVE(10),
                "stop_at": NONNEG(0),  # stop_at > 0: save and stop after that step; the schedule still spans `steps`
                # chunked: the [B, T, V] logits are never all alive
                "loss": choice(*LOSSES)("plain"), "loss_chunk": POSITIVE(1024),
                # 0.02: general bpb at most +2% over the base
                "forgetting_budget": Rule(float, lo=0.0)(0.0), "on_budget": choice("continue", "stop")("continue")},
      "lora": {"rank": POSITIVE(16), "alpha": POSITIVE_FLOAT(32.0), "targets": STR("all-linear"), "rslora": BOOL(False),
               "extra_trainable": STR(""),
               "base_dtype": choice(*DTYPES, "auto")("auto"),  # auto: the compute dtype on GPU/TPU, fp32 on CPU
               # lora | dora | pissa (PiSSA: init from W's top singular directions); a live view of the registry
               "variant": Rule(str, choices=VARIANTS.keys())("lora"),
               "dropout": UNIT_OPEN(0.0),  # on the adapter input, training only
               "plus_ratio": Rule(float, lo=0.0)(0.0),  # LoRA+: B's learning rate = ratio x A's (0 or 1: off)
               "quantize_base": choice(*QUANTIZERS)("none"), "double_quant": BOOL(False),  # nf4: QLoRA
               # Whole embedding / head trained beside the adapters (PEFT modules_to_save; a tied pair is one
               # tensor); embedding_lr > 0: their peak learning rate (same schedule shape), 0: optimizer.lr.
               "train_embeddings": BOOL(False), "train_head": BOOL(False), "embedding_lr": Rule(float, lo=0.0)(0.0)},
      "optimizer": {"lr": POSITIVE_FLOAT(1e-4), "schedule": choice(*SCHEDULES)("cosine"),
                    "warmup_ratio": UNIT_OPEN(0.03), "final_lr_ratio": Rule(float, lo=0.0, hi=1.0)(0.1),
                    "weight_decay": Rule(float, lo=0.0)(0.01), "b1": UNIT_OPEN(0.9), "b2": UNIT_OPEN(0.95),
                    "eps": POSITIVE_FLOAT(1e-8), "clip": Rule(float, lo=0.0)(1.0),
                    # wsd: the final decay's share and shape
                    "decay_fraction": Rule(float, lo=0.0, hi=1.0)(0.2), "decay_shape": choice(*DECAY_SHAPES)("sqrt")},
      # Axis sizes (-1: the rest of the devices); require: refuse to run on another platform.
      "mesh": {"data": schema.MESH_AXIS(-1), "fsdp": schema.MESH_AXIS(1), "tensor": schema.MESH_AXIS(1),
               "require": choice("any", *PLATFORMS)("any")},
      "checkpoint": {"every": POSITIVE(100), "keep": POSITIVE(3), "async_save": BOOL(True), "resume": BOOL(True)},
      "export": {"hf": BOOL(False), "adapter": BOOL(False), "merged": BOOL(False),
                 "dtype": choice(*EXPORT_DTYPES, optional=True)(None),
                 "verify": BOOL(True)},  # the export certificate (convert/certify.py)
      # Weights & Biases beside metrics.jsonl (same keys): an empty project turns it off; offline needs no network.
      "metrics": {"wandb": {"project": STR(""), "name": STR(""), "entity": STR(""),
                            "mode": choice("offline", "online", "disabled")("offline")}},
  }


RULES = schema.rules(train_schema())


def default_config() -> ml_collections.ConfigDict:
  """The training defaults, locked: recipes and overrides may change values, never add keys (a typo fails loudly)."""
  return schema.defaults(train_schema())


def check_rules(cfg):
  """Every key against its rule (a key without a rule is a bug, not a pass), then the mesh's axis sizes."""
  schema.check(cfg, RULES)
  schema.check_mesh(cfg.mesh)


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


TRAIN_USAGE = "usage: --config FILE [--config.key=value ...]"


def split_argv(argv, usage: str = TRAIN_USAGE, options=()) -> dict:
  """A CLI's arguments (`train`, `eval`, `data inspect`): `--config FILE` (or `--config=FILE`), any number of
  `--config.key=value` overrides and the command's own `options` (`--name VALUE` or `--name=VALUE`), in any
  order; a lone `--` is passed over (it was once needed before overrides). -> {"config": FILE,
  "overrides": [...], "--name": VALUE...}; anything else, a missing value or no --config is one line."""
  out = {"overrides": []}
  args = iter(argv)
  for a in args:
    flag, eq, value = a.partition("=")
    if a == "--":
      continue
    if a.startswith("--config.") and eq:
      out["overrides"].append(a)
      continue
    if flag != "--config" and flag not in options:
      raise JaxteleError(f"unknown argument {a!r} ({usage})")
    if not eq:
      value = next(args, None)
      if value is None:
        raise JaxteleError(f"{flag}: needs a value ({usage})")
    out["config" if flag == "--config" else flag] = value
  if not out.get("config"):
    raise JaxteleError(f"--config: required, e.g. --config configs/quickstart.py ({usage})")
  return out


def from_argv(argv) -> ml_collections.ConfigDict:
  """`--config FILE [--config.key=value ...]` (the CLI's arguments) -> a checked config."""
  args = split_argv(argv)
  return load_config(args["config"], args["overrides"])


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
      if spec.get("type") in SOURCES and path and not os.path.exists(path):
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
  check_model_runtime(cfg, model_cfg)
  requested_tokens(cfg.eval)
  check_forgetting(cfg)
  if cfg.train.stop_at > cfg.train.steps:
    raise JaxteleError(f"config: train.stop_at: {cfg.train.stop_at} is past train.steps ({cfg.train.steps})")


def check_model_runtime(cfg, model_cfg: ModelConfig, backend: str | None = None):
  """What the model package would refuse while tracing, refused first under the key that chose it."""
  from jaxtele.build import resolved_attention

  backend = backend or jax.default_backend()
  if model_cfg.remat in HOST_OFFLOAD_REMAT and backend not in ACCELERATORS:
    raise JaxteleError(f"config: model.remat: {model_cfg.remat} needs a GPU or TPU (host offload), not {backend}")
  resolved_attention(model_cfg, backend)
  if cfg.train.loss == "chunked" and model_cfg.final_softcap:
    raise JaxteleError(f"config: train.loss: chunked cannot apply {model_cfg.model_type}'s final soft-capping "
                       f"(final_logit_softcapping={model_cfg.final_softcap}); use train.loss=plain")


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
