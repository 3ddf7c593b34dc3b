"""The jaxtele model format: `config.json` (HF's) + `params/` (an Orbax checkpoint of the parameter
tree) + tokenizer files. Restores straight onto any sharding, without a safetensors round trip."""

import json
import os

import orbax.checkpoint as ocp
from flax import nnx

from jaxtele.errors import JaxteleError
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import Decoder, abstract_model


def is_native(folder: str) -> bool:
  return os.path.isdir(os.path.join(folder, "params")) and os.path.isfile(os.path.join(folder, "config.json"))


def save_native(model: Decoder, folder: str, tokenizer=None):
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(model.config.to_hf(), f, indent=2)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(os.path.abspath(folder), "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)


def load_native(folder: str, **runtime) -> Decoder:
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    cfg = ModelConfig.from_hf(json.load(f), source=path, **runtime)
  model = abstract_model(cfg)
  target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(os.path.abspath(folder), "params"), target)
  except (ValueError, KeyError) as e:
    raise JaxteleError(f"{folder}/params: does not match {path} ({str(e).splitlines()[0][:200]})") from None
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model
