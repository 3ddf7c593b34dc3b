"""Bad adapter input is a one-line JaxteleError naming the file/key: an adapter for another base, an unknown
peft_type, a rank mismatch on resume, merging an NF4 base into a float export without dequantizing."""

import json
import subprocess
import sys

import ml_collections
import pytest

from jaxtele.convert import load_pretrained
from jaxtele.convert.peft import load_adapter, save_adapter
from jaxtele.errors import JaxteleError
from jaxtele.checkpoint import lora_meta
from jaxtele.models.lora import add_lora, merge_lora, quantize_base


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory, make_hf_model):
  d = tmp_path_factory.mktemp("bases")
  make_hf_model("llama_untied").save_pretrained(d / "small")
  other = make_hf_model("llama_untied", hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
  other.save_pretrained(d / "other")
  model = load_pretrained(str(d / "small")).model
  add_lora(model, 4, 8.0)
  save_adapter(model, str(d / "adapter"), base_model=str(d / "small"))
  return d


def one_line(e):
  assert "\n" not in str(e.value)
  return str(e.value)


def test_adapter_for_another_base(two_bases):
  model = load_pretrained(str(two_bases / "other")).model
  with pytest.raises(JaxteleError) as e:
    load_adapter(model, str(two_bases / "adapter"))
  msg = one_line(e)
  assert "adapter_model.safetensors: tensor base_model.model.model.layers.0." in msg and "has shape" in msg


def test_unknown_peft_type(two_bases, tmp_path):
  import shutil

  shutil.copytree(two_bases / "adapter", tmp_path / "ia3")
  cfg = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
  (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "IA3"}))
  with pytest.raises(JaxteleError, match=r"adapter_config.json: peft_type 'IA3' is not supported") as e:
    load_adapter(load_pretrained(str(two_bases / "small")).model, str(tmp_path / "ia3"))
  one_line(e)


def test_rank_mismatch_on_resume_is_refused():
  from jaxtele.checkpoint import check_compatible

  section = lambda **kw: ml_collections.ConfigDict(dict(rank=8, alpha=16.0, targets="all-linear", rslora=False,
                                                        extra_trainable="") | kw)
  saved, now = lora_meta(section()), lora_meta(section(rank=4))
  assert {"rank", "variant", "quantize_base", "plus_ratio", "dropout", "double_quant"} <= set(saved)
  with pytest.raises(JaxteleError, match=r"checkpoint lora differs .*rank: checkpoint 8, run 4") as e:
    check_compatible({"lora": saved}, {"lora": now}, "run/checkpoints/3")
  one_line(e)


def test_quantized_base_is_not_merged_without_dequantizing(two_bases, tmp_path):
  model = load_pretrained(str(two_bases / "small")).model
  quantize_base(model)
  load_adapter(model, str(two_bases / "adapter"))
  msg = r"layers\.0\.\w+\.\w+: the base is NF4-quantized; merging needs dequantize=True"
  with pytest.raises(JaxteleError, match=msg) as e:
    merge_lora(model)
  one_line(e)
  merge_lora(model, dequantize=True)  # asked for: fine


def test_export_cli_imports_a_peft_adapter(two_bases, tmp_path, make_hf_model, hf_logits):
  """python -m jaxtele.export --source ADAPTER --base BASE: the merged HF export = PEFT's adapted model."""
  import numpy as np
  import peft
  import transformers

  out = tmp_path / "merged"
  p = subprocess.run([sys.executable, "-m", "jaxtele.export", "--source", str(two_bases / "adapter"), "--base",
                      str(two_bases / "small"), "--out", str(out), "--format", "hf"],
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  base = transformers.AutoModelForCausalLM.from_pretrained(str(two_bases / "small")).float().eval()
  adapted = peft.PeftModel.from_pretrained(base, str(two_bases / "adapter")).eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(out)).float().eval()
  tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
  np.testing.assert_allclose(hf_logits(merged, tokens), hf_logits(adapted, tokens), atol=1e-4)
  p = subprocess.run([sys.executable, "-m", "jaxtele.export", "--source", str(two_bases / "adapter"), "--base",
                      str(two_bases / "other"), "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.parametrize("override,argument,key", [
    ("--config.lora.targets=no_such_proj", "targets: no linear layer named 'no_such_proj'", "lora.targets"),
    ("--config.lora.targets=re:nothing\\..*", "targets: 're:nothing\\\\..*' selects no linear layer", "lora.targets"),
    ("--config.lora.extra_trainable=nothing_here", "extra: 'nothing_here' matches no parameter", "lora.extra_trainable"),
])
def test_the_model_package_names_its_argument_and_the_build_names_the_config_key(tiny, override, argument, key):
  """models/ knows no config: its error names the argument; build_model maps it to the key it came from."""
  from jaxtele.build import build_model, split_model
  from jaxtele.models.decoder import init_model
  from jaxtele.models.lora import check_extra

  cfg = tiny("--config.train.mode=lora", "--config.lora.rank=4", override)
  with pytest.raises(JaxteleError) as e:
    split_model(build_model(cfg), cfg)
  assert str(e.value).startswith(f"{key}: {argument.split(': ', 1)[1]}")
  direct = init_model(build_model(tiny()).config)
  with pytest.raises(JaxteleError) as e:
    if argument.startswith("extra"):
      check_extra(direct, cfg.lora.extra_trainable)
    else:
      add_lora(direct, 4, 8.0, targets=cfg.lora.targets)
  assert str(e.value).startswith(argument) and "lora." not in str(e.value)
