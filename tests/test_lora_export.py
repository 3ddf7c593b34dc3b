"""LoRA adapters against `peft`: our adapted logits = PEFT's on the exported base + adapter, and the
merged export = both."""

import os

import numpy as np
import pytest
import transformers

from jaxtele.convert import hf, load_pretrained
from jaxtele.convert.peft import save_adapter
from jaxtele.models.lora import add_lora, lora_paths, merge_lora

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 24))


def randomize_adapters(model, seed=0):
  """B starts at zero; give it values so the adapters change the output."""
  from flax import nnx

  rng = np.random.default_rng(seed)
  modules = dict(nnx.iter_modules(model))
  for p in lora_paths(model):
    b = modules[p].adapters["default"].lora_b
    b.set_value(rng.normal(0, 0.05, b.shape).astype(np.float32))


@pytest.mark.parametrize("targets,rslora", [("all-linear", False), ("q_proj,v_proj", True),
                                            (r"re:layers\.1\.mlp\..*", False)])
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, targets, rslora, make_hf_model, hf_logits):
  import peft

  ref = make_hf_model("qwen2_bias")
  ref.save_pretrained(tmp_path / "base")
  model = load_pretrained(str(tmp_path / "base")).model
  base_logits = np.asarray(model(TOKENS))
  add_lora(model, rank=4, alpha=8.0, targets=targets, rslora=rslora)
  np.testing.assert_allclose(np.asarray(model(TOKENS)), base_logits, atol=1e-6)  # B = 0: no change yet
  randomize_adapters(model)
  ours = np.asarray(model(TOKENS))
  assert np.abs(ours - base_logits).max() > 1e-3
  save_adapter(model, str(tmp_path / "adapter"), rank=4, alpha=8.0, rslora=rslora, base_model=str(tmp_path / "base"))
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float().eval()
  theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  n_adapted = sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A"))
  assert n_adapted == len(lora_paths(model))
  np.testing.assert_allclose(hf_logits(theirs, TOKENS), ours, atol=1e-4)
  merge_lora(model)
  hf.save_hf(model, str(tmp_path / "merged"))
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
  np.testing.assert_allclose(hf_logits(merged, TOKENS), ours, atol=1e-4)


def test_trainer_exports_adapter_and_merged_model_that_peft_agrees_with(tmp_path, make_hf_model, hf_logits, tiny):
  """A LoRA run on an HF base: its adapter export on that base = its merged export (in transformers)."""

  import peft

  from jaxtele.train import run

  ref = make_hf_model("llama_untied", vocab_size=264)
  ref.save_pretrained(tmp_path / "base")
  from jaxtele.data.byte_tokenizer import byte_tokenizer

  byte_tokenizer().save_pretrained(tmp_path / "base")
  cfg = tiny(f"--config.model.source={tmp_path / 'base'}", "--config.model.tokenizer=bytes",
             "--config.train.mode=lora", "--config.lora.rank=4", "--config.export.adapter=True",
             "--config.export.merged=True", "--config.data.seq_len=64", "--config.optimizer.lr=1e-2")
  run(cfg)
  out = tmp_path / "run" / "export"
  assert not (out / "base").exists()  # the HF source folder is the adapter's base
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float().eval()
  adapted = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged")).float().eval()
  tokens = np.random.default_rng(1).integers(0, 264, size=(2, 16))
  a, m, b = hf_logits(adapted, tokens), hf_logits(merged, tokens), hf_logits(ref, tokens)
  np.testing.assert_allclose(a, m, atol=1e-4)
  assert np.abs(a - b).max() > 1e-4  # the trained adapter changed the model


def test_export_from_a_run_directory_matches_the_end_of_run_export(tmp_path, hf_logits, lora_export_run):
  """`python -m jaxtele.export --source RUN_DIR` rebuilds the run from its checkpoint: same tensors as
  the trainer's own exports, for a LoRA run on a base that is not an HF folder (the tiny random init)."""
  import subprocess
  import sys

  from safetensors.numpy import load_file

  runs = lora_export_run  # read only: the session's shared LoRA run
  for fmt, out, reference in (("adapter", "cli_adapter", "adapter/adapter_model.safetensors"),
                              ("hf", "cli_merged", "merged/model.safetensors")):
    p = subprocess.run([sys.executable, "-m", "jaxtele.export", "--source", str(runs), "--out", str(tmp_path / out),
                        "--format", fmt], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    want = load_file(str(runs / "export" / reference))
    got = load_file(str(tmp_path / out / os.path.basename(reference)))
    assert sorted(want) == sorted(got) and all(np.array_equal(want[k], got[k]) for k in want)
  # The CLI adapter's base was written beside it and PEFT puts the two together.
  import peft

  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli_adapter-base")).float().eval()
  adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "cli_adapter")).eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "cli_merged")).float().eval()
  tokens = np.random.default_rng(2).integers(0, 264, size=(2, 16))
  np.testing.assert_allclose(hf_logits(adapted, tokens), hf_logits(merged, tokens), atol=1e-4)


def test_a_refused_adapter_export_writes_no_base_and_leaves_an_earlier_one(tmp_path, lora_export_run):
  """An adapter export whose output exists (no --overwrite) is refused before its base is written: no
  `OUT-base` appears, and an earlier one, which an existing adapter points at, keeps its bytes."""
  from jaxtele.errors import JaxteleError
  from jaxtele.export import export

  out = tmp_path / "taken"
  out.mkdir()
  with pytest.raises(JaxteleError, match="already exists"):
    export(str(lora_export_run), str(out), "adapter", verify=False)
  assert not (tmp_path / "taken-base").exists() and list(out.iterdir()) == []
  earlier = tmp_path / "taken-base"
  earlier.mkdir()
  (earlier / "config.json").write_text("{}")
  with pytest.raises(JaxteleError, match="already exists"):
    export(str(lora_export_run), str(out), "adapter", verify=False)
  assert [p.name for p in earlier.iterdir()] == ["config.json"] and (earlier / "config.json").read_text() == "{}"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "taken-base"]  # no temporary folder left


def test_jaxtele_format_round_trip(tmp_path, make_hf_model, hf_logits):
  from jaxtele.export import export

  ref = make_hf_model("qwen2_bias")
  ref.save_pretrained(tmp_path / "hf")
  export(str(tmp_path / "hf"), str(tmp_path / "native"), fmt="jaxtele")
  model = load_pretrained(str(tmp_path / "native")).model
  np.testing.assert_allclose(np.asarray(model(TOKENS)), hf_logits(ref, TOKENS), atol=1e-4)
  export(str(tmp_path / "native"), str(tmp_path / "back"), fmt="hf")
  from safetensors.numpy import load_file

  a, b = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
