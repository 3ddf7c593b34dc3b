"""LoRA adapters out as PEFT adapters: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores `lora_A.weight` [r, in] and `lora_B.weight` [out, r] under the base module's name, the
transposes of our `lora_a` [in, r] and `lora_b` [r, out]; scaling is alpha / r (alpha / sqrt(r) for rsLoRA).
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

from jaxtele.models.layers import Linear
from jaxtele.models.lora import lora_paths, module_name


def peft_prefix(path) -> str:
  head = "" if path[0] == "lm_head" else "model."
  return f"base_model.model.{head}{module_name(path)}"


def adapter_tensors(model) -> dict[str, np.ndarray]:
  from flax import nnx

  modules = dict(nnx.iter_modules(model))
  out = {}
  for path in lora_paths(model):
    lin: Linear = modules[path]
    out[f"{peft_prefix(path)}.lora_A.weight"] = np.ascontiguousarray(np.asarray(lin.lora_a[...], np.float32).T)
    out[f"{peft_prefix(path)}.lora_B.weight"] = np.ascontiguousarray(np.asarray(lin.lora_b[...], np.float32).T)
  return out


def target_modules(model, paths):
  """PEFT target_modules: module names when they select exactly `paths`, else an exact-path regex."""
  from flax import nnx

  names = sorted({str(p[-1]) for p in paths})
  same_name = [p for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and str(p[-1]) in names]
  if sorted(same_name) == sorted(paths):
    return names
  return "|".join(("model\\." if p[0] != "lm_head" else "") + module_name(p).replace(".", "\\.") for p in paths)


def save_adapter(model, folder: str, *, rank: int, alpha: float, rslora: bool = False, base_model: str = ""):
  os.makedirs(folder, exist_ok=True)
  paths = lora_paths(model)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
      "target_modules": target_modules(model, paths), "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": False, "inference_mode": True,
      "base_model_name_or_path": base_model, "modules_to_save": None, "init_lora_weights": True,
  }
  with open(os.path.join(folder, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(adapter_tensors(model), os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
