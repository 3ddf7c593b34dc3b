"""Reload an export the way its users will: `transformers` (HF folders), `peft` on the base (adapters), the gguf
reader + our importer (GGUF), our loader (jaxtele folders). Each loader gives the certificate (certify.py) the
artifact's logits, tokenizer and greedy generation; a missing optional library falls back to our own loader and
says so in `notes`."""

import importlib
import os

import numpy as np

from jaxtele.errors import JaxteleError

GEN_TOKENS = 32


def _optional(name: str):
  """The module, or None when it is not installed (the certificate records a skip)."""
  try:
    return importlib.import_module(name)
  except ImportError:
    return None


def jax_logits(model, ids_BT) -> np.ndarray:
  """One compiled forward (cached across models of one structure): eager ops would compile one by one."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  # nnx.jit writes its outputs back into the model's variables: a shallow copy keeps the caller's arrays as
  # they were, so what is exported afterwards is computed from the same inputs, bit for bit.
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, nnx.to_pure_dict(state)))  # new variables, same arrays
  return np.asarray(_forward()(copy, jnp.asarray(ids_BT, jnp.int32)), np.float32)


_FORWARD = []


def _forward():
  if not _FORWARD:
    from flax import nnx

    _FORWARD.append(nnx.jit(lambda model, ids_BT: model(ids_BT)))
  return _FORWARD[0]


class Artifact:
  """A reloaded export: its logits on ids, its tokenizer, greedy generation, and how it was loaded."""

  def __init__(self, loader, logits, tokenizer, generate, notes=()):
    self.loader, self.logits, self.tokenizer, self.generate, self.notes = loader, logits, tokenizer, generate, notes


def _ours(model, tokenizer, loader, notes=()):
  from jaxtele.generation import greedy

  return Artifact(loader, lambda ids: jax_logits(model, ids), tokenizer,
                  lambda prompt, stop: greedy(model, prompt, GEN_TOKENS, stop), list(notes))


def _torch(model, tokenizer, loader, notes=()):
  torch = importlib.import_module("torch")

  def logits(ids):
    with torch.no_grad():
      return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()

  def generate(prompt, stop):
    with torch.no_grad():
      out = model.generate(torch.as_tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=GEN_TOKENS, do_sample=False, eos_token_id=list(stop),
                           pad_token_id=stop[0])
    return out[0, len(prompt):].tolist()

  return Artifact(loader, logits, tokenizer, generate, list(notes))


def _hf_tokenizer(folder):
  from jaxtele.convert import load_tokenizer

  return load_tokenizer(folder)


def load_hf(folder: str, **_) -> Artifact:
  transformers, torch = _optional("transformers"), _optional("torch")
  if transformers is None or torch is None:
    from jaxtele.convert import load_pretrained

    pre = load_pretrained(folder)
    missing = "transformers" if transformers is None else "torch"
    return _ours(pre.model, pre.tokenizer, "jaxtele", [f"reload: skipped: {missing} not installed (jaxtele's loader)"])
  transformers.utils.logging.disable_progress_bar()  # the export's own output stays readable
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return _torch(model, _hf_tokenizer(folder), f"transformers {transformers.__version__}")


def load_adapter_artifact(folder: str, base: str = "", tokenizer=None, **_) -> Artifact:
  """PEFT on its base; keys the adapter file lacks or has in excess fail the reload."""
  transformers, torch, peft = _optional("transformers"), _optional("torch"), _optional("peft")
  if not base:
    raise JaxteleError("certificate: reload: the adapter names no base to load it on")
  if None in (transformers, torch, peft):
    from jaxtele.convert import load_pretrained
    from jaxtele.convert.peft import load_adapter

    missing = next(n for n, m in (("transformers", transformers), ("torch", torch), ("peft", peft)) if m is None)
    model = load_adapter(load_pretrained(base).model, folder)
    return _ours(model, tokenizer, "jaxtele", [f"reload: skipped: {missing} not installed (jaxtele's loader)"])
  from peft.utils import load_peft_weights

  on = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
  model = peft.PeftModel.from_pretrained(on, folder).eval()
  expected = set(peft.get_peft_model_state_dict(model))
  found = set(load_peft_weights(folder, device="cpu"))
  art = _torch(model, tokenizer, f"peft {peft.__version__} on {base}")
  art.missing, art.unexpected = sorted(expected - found), sorted(found - expected)
  return art


def load_gguf_artifact(folder: str, **_) -> Artifact:
  if _optional("gguf") is None:
    raise JaxteleError("certificate: reload: the gguf package is not installed")
  from jaxtele.convert import load_pretrained
  from jaxtele.export import GGUF_FILE

  pre = load_pretrained(os.path.join(folder, GGUF_FILE))
  return _ours(pre.model, pre.tokenizer, "gguf reader + jaxtele importer")


def load_native_artifact(folder: str, **_) -> Artifact:
  from jaxtele.convert import load_pretrained

  pre = load_pretrained(folder)
  return _ours(pre.model, pre.tokenizer, "jaxtele loader")


LOADERS = {"hf": load_hf, "adapter": load_adapter_artifact, "gguf": load_gguf_artifact, "jaxtele": load_native_artifact}
