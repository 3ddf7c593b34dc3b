"""The decoder against `transformers` on tiny random models of each family; packing isolation."""

import json

import numpy as np
import pytest
import transformers

from jaxtele.convert import hf, load_pretrained

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 24))


@pytest.fixture(params=["gqa_kv1", "gqa_kv4", "llama3_rope", "llama_bias", "llama_tied", "llama_untied",
                        "mistral_window", "qwen2_bias"])
def hf_folder(request, tmp_path, make_hf_model):
  model = make_hf_model(request.param)
  model.save_pretrained(tmp_path / "hf")
  return model, str(tmp_path / "hf")


def test_logits_match_transformers(hf_folder, hf_logits):
  ref, folder = hf_folder
  ours = load_pretrained(folder).model
  diff = np.abs(np.asarray(ours(TOKENS)) - hf_logits(ref, TOKENS)).max()
  assert diff <= 1e-4, diff


def test_roundtrip_is_bit_exact_and_loads_in_transformers(hf_folder, tmp_path, hf_logits, assert_bit_exact_export):
  ref, folder = hf_folder
  ours = load_pretrained(folder).model
  assert_bit_exact_export(ours, folder, str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
  diff = np.abs(hf_logits(back, TOKENS) - np.asarray(ours(TOKENS))).max()
  assert diff <= 1e-4, diff


def test_sharded_export_loads_in_transformers(tmp_path, make_hf_model, hf_logits):
  ref = make_hf_model("llama_untied")
  ref.save_pretrained(tmp_path / "hf")
  ours = load_pretrained(str(tmp_path / "hf")).model
  hf.save_hf(ours, str(tmp_path / "out"), max_shard_bytes=40_000)
  index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
  assert len(set(index["weight_map"].values())) > 1
  reread = load_pretrained(str(tmp_path / "out")).model  # our own sharded reader
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
  np.testing.assert_allclose(hf_logits(back, TOKENS), hf_logits(ref, TOKENS), atol=1e-5)
  np.testing.assert_allclose(np.asarray(reread(TOKENS)), hf_logits(ref, TOKENS), atol=1e-4)


def test_packed_documents_do_not_see_each_other(make_hf_model):
  """Three documents in one row give each document's logits alone (<= 1e-5)."""
  ref = make_hf_model("llama_untied")
  model = load_pretrained_from(ref)
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 97, size=n) for n in (7, 12, 5)]
  row = np.concatenate(docs + [np.zeros(4, int)])[None]
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(4, int)])[None]
  positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(4, int)])[None]
  packed = np.asarray(model(row, positions, segments))
  start = 0
  for d in docs:
    alone = np.asarray(model(d[None]))
    np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0], atol=1e-5)
    start += len(d)
  assert np.isfinite(packed).all()  # padding rows stay finite


def test_bf16_compute_is_close_to_fp32(make_hf_model):
  ref = make_hf_model("llama_untied")
  fp32 = load_pretrained_from(ref)
  bf16 = load_pretrained_from(ref, dtype="bfloat16", param_dtype="bfloat16")
  assert bf16.layers[0].mlp.up_proj.kernel[...].dtype == np.dtype("bfloat16")
  a, b = np.asarray(fp32(TOKENS)), np.asarray(bf16(TOKENS)).astype(np.float32)
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def load_pretrained_from(ref, **runtime):
  import tempfile

  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    return load_pretrained(d, **runtime).model
