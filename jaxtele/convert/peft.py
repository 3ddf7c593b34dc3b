"""Adapters in and out as PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores each adapter tensor under the base module's name, as the transpose of our leaf (PyTorch keeps
[out, in]): LoRA's A [R, I] and B [O, R], DoRA's magnitude [O]; scaling is alpha / R (alpha / sqrt(R) for
rsLoRA). Each adapter class declares its own tensors, config fields, PEFT rank and `from_peft`
(models/adapters.py), and the class a folder loads as comes from that registry; this module maps module paths
and the config. A PiSSA adapter is written as a plain LoRA of rank 2R against the ORIGINAL base (PEFT's
`path_initial_model_for_weight_conversion`): r and lora_alpha double (alpha x sqrt 2 for rsLoRA), so the
scaling is unchanged.

Whole modules trained beside the adapters travel as PEFT's `modules_to_save` (`embed_tokens`, `lm_head`), as
full HF tensors under the base module's name. On a tied base the embedding is the head: it is written once as
`embed_tokens` with `ensure_weight_tying` (PEFT then ties lm_head to it, and writes the tensor under both
names, as we do), and an adapter whose head differs from its embedding on a tied base is refused, not untied.
"""

import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxtele.errors import JaxteleError, read_json
from jaxtele.models.adapters import RSLORA, peft_class, peft_leaves, scaling, uses_rslora
from jaxtele.models.lora import DEFAULT, EMBED, HEAD, attach, linears, lora_paths, module_name

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def peft_prefix(path) -> str:
  head = "" if path[0] == "lm_head" else "model."
  return f"{PREFIX}{head}{module_name(path)}"


def adapters_of(model, name: str) -> dict:
  mods = linears(model)
  return {p: mods[p].adapters[name] for p in lora_paths(model, name)}


def adapter_tensors(model, name: str = DEFAULT) -> dict[str, np.ndarray]:
  out = {}
  for path, adapter in adapters_of(model, name).items():
    for suffix, x in adapter.peft_tensors().items():
      out[f"{peft_prefix(path)}.{suffix}"] = np.ascontiguousarray(np.asarray(x, np.float32))
  return out


def target_modules(model, paths):
  """PEFT target_modules: module names when they select exactly `paths`, else an exact-path regex."""
  names = sorted({str(p[-1]) for p in paths})
  same_name = [p for p in linears(model) if str(p[-1]) in names]
  if sorted(same_name) == sorted(paths):
    return names
  return "|".join(("model\\." if p[0] != "lm_head" else "") + module_name(p).replace(".", "\\.") for p in paths)


MODULE_KEYS = {EMBED: f"{PREFIX}model.embed_tokens.weight", HEAD: f"{PREFIX}lm_head.weight"}


def module_tensors(model, modules) -> dict[str, np.ndarray]:
  """HF tensors of the whole modules saved with an adapter ([V, D] both; our head kernel is [D, V])."""
  out = {}
  tied = model.lm_head is None
  for m in modules:
    if m == HEAD and tied:
      raise JaxteleError("modules_to_save: lm_head on a tied base is the embedding; save embed_tokens")
    if m == EMBED:
      out[MODULE_KEYS[EMBED]] = np.asarray(model.embed_tokens.embedding[...], np.float32)
      if tied:
        out[MODULE_KEYS[HEAD]] = out[MODULE_KEYS[EMBED]]
    elif m == HEAD:
      out[MODULE_KEYS[HEAD]] = np.asarray(model.lm_head.kernel[...], np.float32).T
    else:
      raise JaxteleError(f"modules_to_save: {m!r} is not supported (only {EMBED}, {HEAD})")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_adapter(model, folder: str, *, name: str = DEFAULT, rslora: bool = False, base_model: str = "",
                 modules_to_save=(), **_):
  """Adapter `name` as a PEFT adapter folder. r and lora_alpha follow from the adapter (rank, scale);
  `modules_to_save` (embed_tokens, lm_head) are written whole beside it."""
  found = adapters_of(model, name)
  if not found:
    raise JaxteleError(f"adapter {name!r}: the model has no such adapter to export")
  kinds = {(type(a), a.rank, a.scale, a.dropout) for a in found.values()}
  if len(kinds) > 1:
    raise JaxteleError(f"adapter {name!r}: its layers differ in variant, rank or scale; PEFT needs one of each")
  first = next(iter(found.values()))
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.peft_rank, "lora_alpha": first.peft_alpha(rslora),
      "target_modules": target_modules(model, list(found)), "lora_dropout": first.dropout, "bias": "none",
      "fan_in_fan_out": False, RSLORA: rslora, "inference_mode": True,
      "base_model_name_or_path": base_model, "modules_to_save": list(modules_to_save) or None, **first.peft_config(),
  }
  if modules_to_save and model.lm_head is None:
    config["ensure_weight_tying"] = True
  tensors = adapter_tensors(model, name) | module_tensors(model, modules_to_save)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(folder, WEIGHTS), metadata={"format": "pt"})


def read_config(folder: str) -> dict:
  path = os.path.join(folder, CONFIG)
  config = read_json(path, "missing (not a PEFT adapter folder)")
  if config.get("peft_type") != "LORA":
    raise JaxteleError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
  for key, off in (("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False), ("fan_in_fan_out", False)):
    if config.get(key) not in (off, None, {}, [], False):
      raise JaxteleError(f"{path}: {key}={config[key]!r} is not supported")
  config["modules_to_save"] = saved_modules_of(config, path)
  return config


def saved_modules_of(config: dict, where: str) -> list[str]:
  """PEFT's modules_to_save as our names (PEFT may list a module by its dotted path, `model.embed_tokens`)."""
  out = []
  for m in config.get("modules_to_save") or []:
    short = str(m).rsplit(".", 1)[-1]
    if short not in (EMBED, HEAD):
      raise JaxteleError(f"{where}: modules_to_save {m!r} is not supported (only {EMBED}, {HEAD})")
    if short not in out:
      out.append(short)
  return out


def read_tensors(folder: str) -> dict[str, dict[str, np.ndarray]]:
  """{module name (dotted, ours): {suffix: array}} from the adapter's safetensors."""
  path = os.path.join(folder, WEIGHTS)
  if not os.path.exists(path):
    raise JaxteleError(f"{path}: missing (only safetensors adapters are read)")
  # PEFT writes a vector's tensor with or without a `.weight` ending (DoRA's magnitude, by version).
  suffixes = {s: s for s in peft_leaves()} | {s + ".weight": s for s in peft_leaves() if not s.endswith(".weight")}
  out = {}
  with safe_open(path, framework="numpy") as f:
    for key in f.keys():
      if key in MODULE_KEYS.values():
        continue  # whole modules: read_modules
      if not key.startswith(PREFIX):
        raise JaxteleError(f"{path}: tensor {key!r} does not start with {PREFIX!r}")
      rest = key[len(PREFIX):]
      rest = rest[len("model."):] if rest.startswith("model.") else rest
      for suffix, name in suffixes.items():
        if rest.endswith("." + suffix):
          module = rest[:-len(suffix) - 1]
          out.setdefault(module, {})[name] = f.get_tensor(key)
          break
      else:
        raise JaxteleError(f"{path}: tensor {key!r} is not a LoRA/DoRA tensor")
  return out


def read_modules(folder: str, modules) -> dict[str, np.ndarray]:
  """{embed_tokens | lm_head: HF tensor [V, D]} of the modules the adapter saved whole."""
  path = os.path.join(folder, WEIGHTS)
  with safe_open(path, framework="numpy") as f:
    keys = set(f.keys())
    out = {m: f.get_tensor(MODULE_KEYS[m]) for m in (EMBED, HEAD) if MODULE_KEYS[m] in keys}
  for m in modules:
    if m not in out:
      raise JaxteleError(f"{path}: modules_to_save names {m} but the file has no {MODULE_KEYS[m]}")
  for m in set(out) - set(modules):
    if not (m == HEAD and EMBED in modules):  # PEFT writes a tied head under both names
      raise JaxteleError(f"{path}: tensor {MODULE_KEYS[m]} is not listed in modules_to_save")
  return out


def set_modules(model, tensors: dict, listed, where: str):
  """Put saved embeddings / head into the model (in place: they replace the base's, for every adapter)."""
  emb = model.embed_tokens.embedding
  tied = model.lm_head is None
  if EMBED in tensors:
    x = tensors[EMBED]
    if x.shape != emb.shape:
      raise JaxteleError(f"{where}: tensor {MODULE_KEYS[EMBED]} has shape {list(x.shape)}, this base needs "
                         f"{list(emb.shape)}")
    emb.set_value(np.asarray(x, np.float32).astype(emb.dtype))
  if HEAD in tensors and (tied or HEAD in listed):
    x = tensors[HEAD]
    if tied:
      if EMBED not in tensors or not np.array_equal(x, tensors[EMBED]):
        raise JaxteleError(f"{where}: {MODULE_KEYS[HEAD]} differs from the embedding, but this base ties its "
                           "head to its embedding (an untied adapter; jaxtele never unties silently)")
      return
    kernel = model.lm_head.kernel
    if x.shape[::-1] != kernel.shape:
      raise JaxteleError(f"{where}: tensor {MODULE_KEYS[HEAD]} has shape {list(x.shape)}, this base needs "
                         f"{list(kernel.shape[::-1])}")
    kernel.set_value(np.asarray(x, np.float32).T.astype(kernel.dtype))


def check_shapes(tensors: dict, lin, rank: int, where: str, module: str, cls):
  """Every tensor has the shape its declared leaf takes on this base at `rank`, and `cls` finds all of its own."""
  d_in, d_out = lin.shape
  declared = peft_leaves()
  for suffix, x in tensors.items():
    want = declared[suffix].peft_shape(d_in, d_out, rank)
    if tuple(x.shape) != want:
      key = f"{PREFIX}{'' if module.startswith('lm_head') else 'model.'}{module}.{suffix}"
      raise JaxteleError(f"{where}: tensor {key} has shape {list(x.shape)}, this base needs "
                         f"{list(want)} (an adapter for another base, or r={rank} differs)")
  missing = [leaf.peft for leaf in cls.LEAVES if leaf.peft and leaf.peft not in tensors]
  if missing:
    raise JaxteleError(f"{where}: module {module} lacks {missing[0]} (a {cls.variant} adapter, by its "
                       f"adapter_config.json)")


def load_adapter(model, adapter_dir: str, name: str = DEFAULT):
  """Load a PEFT LoRA/rsLoRA/DoRA adapter onto `model` as adapter `name` (in place; the base is shared, not
  copied). An adapter already there under `name` with the same shapes takes the new weights in place, so a
  jitted forward is reused. Returns `model`."""
  config = read_config(adapter_dir)
  where = os.path.join(adapter_dir, WEIGHTS)
  rank, alpha = int(config["r"]), float(config["lora_alpha"])
  scale = scaling(rank, alpha, uses_rslora(config))
  cls = peft_class(config, os.path.join(adapter_dir, CONFIG))
  mods = {module_name(p): m for p, m in linears(model).items()}
  for module, tensors in read_tensors(adapter_dir).items():
    if module not in mods:
      raise JaxteleError(f"{where}: module {module!r} is not a linear layer of this base")
    check_shapes(tensors, mods[module], rank, where, module, cls)
    adapter = cls.from_peft({k: np.asarray(v, np.float32) for k, v in tensors.items()}, mods[module], scale=scale,
                            dropout=float(config.get("lora_dropout") or 0.0))
    attach(mods[module], name, adapter)
  set_modules(model, read_modules(adapter_dir, config["modules_to_save"]), config["modules_to_save"], where)
  return model


def merge_folders(folders, weights, method: str = "linear", base: str | None = None, *, as_adapter: bool = True,
                  **kw):
  """PEFT adapter folders on one base, merged (models/merge.py) into that base's adapter `default` (as_adapter)
  or into its kernels. -> (model, tokenizer, base source)."""
  from jaxtele.convert import load_pretrained
  from jaxtele.models import merge

  configs = [read_config(f) for f in folders]
  for f, c in zip(folders, configs, strict=True):
    if c["modules_to_save"]:
      raise JaxteleError(f"{os.path.join(f, CONFIG)}: adapters with modules_to_save cannot be merged "
                         "(their whole modules would overwrite each other)")
  base = base or configs[0].get("base_model_name_or_path") or ""
  if not base:
    raise JaxteleError(f"{folders[0]}: the adapter names no base model; pass --base")
  pre = load_pretrained(base)
  names = [f"source{i}" for i in range(len(folders))]
  for f, n in zip(folders, names, strict=True):
    load_adapter(pre.model, f, n)
  if not as_adapter:
    return merge.fold_merge(pre.model, names, weights, method, **{k: v for k, v in kw.items() if k != "rank"}), \
        pre.tokenizer, base
  merge.merge_adapters(pre.model, names, weights, method, out=DEFAULT, **kw)
  for lin in linears(pre.model).values():
    for n in names:
      lin.adapters.pop(n, None)
    lin.active = DEFAULT if DEFAULT in lin.adapters else None
  return pre.model, pre.tokenizer, base
