"""Qwen3 and Gemma 1/2/3 as configurations of the one decoder, against `transformers` (eager attention) on tiny
random models; HF round trips; soft-capping refused by the fused kernels; LoRA/PEFT and the trainer on them."""


import numpy as np
import pytest
import transformers

from jaxtele.convert import hf, load_pretrained
from jaxtele.errors import JaxteleError

FAMILIES = ["qwen3", "gemma", "gemma2", "gemma3"]
TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 24))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, make_hf_model):
  """(name, transformers model, its saved folder, our model loaded from it)."""
  ref = make_hf_model(request.param)
  folder = tmp_path_factory.mktemp(request.param) / "hf"
  ref.save_pretrained(folder)
  return request.param, ref, str(folder), load_pretrained(str(folder)).model


def test_logits_match_transformers(family, hf_logits):
  _, ref, _, ours = family
  diff = np.abs(np.asarray(ours(TOKENS)) - hf_logits(ref, TOKENS)).max()
  assert diff <= 1e-4, diff


def test_packed_documents_equal_each_document_alone_in_transformers(family, hf_logits):
  """Three documents and padding in one row: each document's logits = transformers on that document alone
  (the gemma2/3 window of 8 is shorter than the 12-token document, so per-layer windows are exercised)."""
  _, ref, _, ours = family
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 97, size=n) for n in (7, 12, 5)]
  row = np.concatenate(docs + [np.zeros(4, int)])[None]
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(4, int)])[None]
  positions = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(4, int)])[None]
  packed = np.asarray(ours(row, positions, segments))
  assert np.isfinite(packed).all()
  start = 0
  for d in docs:
    np.testing.assert_allclose(packed[0, start:start + len(d)], hf_logits(ref, d[None])[0], atol=1e-4)
    start += len(d)


def test_hf_roundtrip_is_bit_exact_and_loads_in_transformers(family, tmp_path, hf_logits, assert_bit_exact_export):
  name, ref, folder, ours = family
  assert_bit_exact_export(ours, folder, str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
  assert type(back) is type(ref)
  for key in ("layer_types", "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
              "final_logit_softcapping", "rope_parameters", "hidden_activation", "hidden_act", "head_dim"):
    assert getattr(back.config, key, None) == getattr(ref.config, key, None), key
  diff = np.abs(hf_logits(back.float().eval(), TOKENS) - np.asarray(ours(TOKENS))).max()
  assert diff <= 1e-4, diff


def test_hf_names_of_the_new_leaves(family):
  name, _, _, ours = family
  keys = set(hf.to_hf_tensors(ours))
  if name in ("qwen3", "gemma3"):
    assert "model.layers.0.self_attn.q_norm.weight" in keys and "model.layers.1.self_attn.k_norm.weight" in keys
  if name in ("gemma2", "gemma3"):
    assert {"model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight"} <= keys


def test_fused_kernels_refuse_softcap_and_auto_picks_xla():
  from jaxtele.build import resolved_attention
  from jaxtele.models.attention import resolve_attention
  from jaxtele.models.config import ModelConfig

  for impl in ("cudnn", "pallas"):
    with pytest.raises(JaxteleError, match=f"^{impl}: .*soft-capping"):
      resolve_attention(impl, "bfloat16", 256, backend="gpu", softcap=50.0)
    with pytest.raises(JaxteleError, match=f"^config: model.attention: {impl}: .*soft-capping"):
      resolved_attention(ModelConfig(attention=impl, dtype="bfloat16", head_dim=256, attn_softcap=50.0), "gpu")
  assert resolve_attention("auto", "bfloat16", 128, backend="gpu", softcap=50.0) == "xla"
  assert resolve_attention("auto", "bfloat16", 128, backend="gpu") == "cudnn"


def test_chunked_loss_refuses_final_softcap_and_plain_loss_matches_transformers(family, hf_logits):
  import jax
  from flax import nnx

  from jaxtele.step import loss_sums

  name, ref, _, ours = family
  graphdef, params = nnx.split(ours)
  batch = {"tokens": TOKENS[:, :-1], "targets": TOKENS[:, 1:], "positions": np.tile(np.arange(23), (2, 1)),
           "segment_ids": np.ones((2, 23), np.int32), "loss_mask": np.ones((2, 23), np.int32)}
  batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
  total, count = loss_sums(graphdef, params, {}, batch, "plain")
  logits = hf_logits(ref, TOKENS[:, :-1])
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, TOKENS[:, 1:, None], -1).sum()
  assert int(count) == 46 and abs(float(total) - nll) <= 1e-3 * abs(nll), (float(total), nll)
  if ours.config.final_softcap:
    with pytest.raises(JaxteleError, match="final_logit_softcapping"):
      jax.eval_shape(lambda p: loss_sums(graphdef, p, {}, batch, "chunked"), params)
  else:
    chunked, _ = loss_sums(graphdef, params, {}, batch, "chunked", chunk=16)
    assert abs(float(chunked) - nll) <= 1e-3 * abs(nll)


def test_peft_adapter_on_new_family_matches_peft(family, tmp_path, hf_logits):
  """LoRA on q/k/v/o and the MLP by HF module names; PEFT on the transformers model gives the same logits."""
  import peft
  from flax import nnx

  from jaxtele.convert.peft import save_adapter
  from jaxtele.models.lora import add_lora, lora_paths

  name, _, folder, _ = family
  model = load_pretrained(folder).model
  add_lora(model, rank=4, alpha=8.0, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj")
  rng = np.random.default_rng(0)
  modules = dict(nnx.iter_modules(model))
  for p in lora_paths(model):
    b = modules[p].adapters["default"].lora_b
    b.set_value(rng.normal(0, 0.05, b.shape).astype(np.float32))
  ours = np.asarray(model(TOKENS))
  save_adapter(model, str(tmp_path / "adapter"), rank=4, alpha=8.0, base_model=folder)
  base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
  theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  assert sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A")) == len(lora_paths(model)) == 12
  np.testing.assert_allclose(hf_logits(theirs, TOKENS), ours, atol=1e-4)


def test_config_refusals():
  from jaxtele.models.config import ModelConfig

  base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
  with pytest.raises(JaxteleError, match="cfg.json: unsupported hidden activation 'relu'"):
    ModelConfig.from_hf(dict(base, model_type="gemma2", hidden_activation="relu"), source="cfg.json")
  with pytest.raises(JaxteleError, match="cfg.json: layer_types must list 2 of"):
    ModelConfig.from_hf(dict(base, model_type="gemma2", layer_types=["sliding_attention"]), source="cfg.json")
  with pytest.raises(JaxteleError, match="use_bidirectional_attention"):
    ModelConfig.from_hf(dict(base, model_type="gemma3_text", use_bidirectional_attention=True), source="cfg.json")
  with pytest.raises(JaxteleError, match="use_sliding_window=true is not supported for qwen3"):
    ModelConfig.from_hf(dict(base, model_type="qwen3", use_sliding_window=True), source="cfg.json")
  # Older Gemma 3 configs: sliding_window_pattern and rope_local_base_freq instead of layer_types/rope_parameters.
  cfg = ModelConfig.from_hf(dict(base, model_type="gemma3_text", num_hidden_layers=7, sliding_window=16,
                                 rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6))
  assert [cfg.layer_window(i) for i in range(7)] == [16] * 5 + [None, 16]
  assert cfg.layer_rope(0).rope_theta == 1e4 and cfg.layer_rope(5).rope_theta == 1e6


def test_trainer_runs_lora_on_gemma2_and_exports_a_model_transformers_loads(tmp_path, make_hf_model, tiny,
                                                                          hf_logits):
  """The trainer, unchanged, on a Gemma 2 base (soft-caps, sandwich norms, windows): the loss falls and the
  merged export equals PEFT's view of the exported adapter."""
  import json

  import peft

  from jaxtele.data.byte_tokenizer import byte_tokenizer
  from jaxtele.train import run

  ref = make_hf_model("gemma2", vocab_size=264, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  ref.save_pretrained(tmp_path / "base")
  byte_tokenizer().save_pretrained(tmp_path / "base")
  cfg = tiny(f"--config.model.source={tmp_path / 'base'}", "--config.model.tokenizer=bytes",
             "--config.train.mode=lora", "--config.lora.rank=4", "--config.export.adapter=True",
             "--config.export.merged=True", "--config.data.seq_len=64", "--config.optimizer.lr=1e-2")
  run(cfg)
  losses = [json.loads(line)["train/loss"] for line in open(tmp_path / "run" / "metrics.jsonl")
            if "train/loss" in line]
  assert losses[-1] < losses[0]
  out = tmp_path / "run" / "export"
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged"), attn_implementation="eager")
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
  adapted = peft.PeftModel.from_pretrained(base.float().eval(), str(out / "adapter")).eval()
  tokens = np.random.default_rng(0).integers(3, 264, size=(2, 24))
  np.testing.assert_allclose(hf_logits(merged.float().eval(), tokens), hf_logits(adapted, tokens), atol=1e-4)
