"""Export certificates: every format is reloaded by its users' library and checked before it is renamed into
place; a deliberately broken export (wrong transpose, dropped lora_B, missing merge, lost chat template, changed
weight) is refused with one line and leaves nothing behind."""

import glob
import json
import os

import numpy as np
import pytest

from jaxtele.convert import hf, native
from jaxtele.errors import JaxteleError
from jaxtele.export import export, main

VOCAB = 300
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"


def bpe_tokenizer(chat_template=None):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(["the session management function selects a user plane function for the river"] * 20,
                         trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", chat_template=chat_template)


@pytest.fixture(scope="module")
def src(tmp_path_factory, make_hf_model):
  """A tiny random Llama with a BPE tokenizer (merges, no chat template) as an HF folder."""
  folder = tmp_path_factory.mktemp("certify") / "src"
  make_hf_model("llama_untied", vocab_size=VOCAB).save_pretrained(folder)
  bpe_tokenizer().save_pretrained(folder)
  return str(folder)


def certificate(out):
  return json.load(open(os.path.join(out, "certificate.json")))


def refused(out, match, *args, **kwargs):
  with pytest.raises(JaxteleError, match=match) as e:
    export(*args, out=str(out), **kwargs)
  assert not os.path.exists(out) and not glob.glob(str(out) + "*") and not glob.glob(
      os.path.join(os.path.dirname(out), ".tmp-*"))
  return str(e.value)


def test_hf_certificate_and_a_wrong_transpose_is_refused(src, tmp_path, monkeypatch, make_hf_model, hf_logits):
  export(src, str(tmp_path / "ok"))
  cert = certificate(tmp_path / "ok")
  assert cert["passed"] and cert["checks"]["reload"]["loader"].startswith("transformers")
  assert cert["checks"]["tokenizer"]["status"] == "pass" and cert["versions"]["torch"]
  real = hf.to_hf_tensors

  def transposed(model, dtype=None):  # q_proj is square here: only the numbers can tell
    out = real(model, dtype)
    out["model.layers.0.self_attn.q_proj.weight"] = np.ascontiguousarray(out["model.layers.0.self_attn.q_proj.weight"].T)
    return out

  monkeypatch.setattr(hf, "to_hf_tensors", transposed)
  msg = refused(tmp_path / "bad", r"^certificate: logits: max \|dlogit\| [0-9.e+-]+ > 0.005 \(float32\)", src)
  assert "\n" not in msg
  # An existing output is not replaced by a refused export, even with overwrite.
  before = open(tmp_path / "ok" / "model.safetensors", "rb").read()
  with pytest.raises(JaxteleError, match="certificate: logits"):
    export(src, str(tmp_path / "ok"), overwrite=True)
  assert open(tmp_path / "ok" / "model.safetensors", "rb").read() == before


def test_a_tokenizer_with_a_missing_merge_is_refused(src, tmp_path, monkeypatch):
  real = hf.save_hf

  def drop_merge(model, folder, **kw):
    real(model, folder, **kw)
    path = os.path.join(folder, "tokenizer.json")
    state = json.load(open(path))
    state["model"]["merges"] = state["model"]["merges"][1:]  # the first merge is the most frequent pair
    json.dump(state, open(path, "w"))

  monkeypatch.setattr(hf, "save_hf", drop_merge)
  refused(tmp_path / "bad", r"^certificate: tokenizer: text 0: \d+ of \d+ ids differ", src)


def test_adapter_with_a_dropped_lora_b_is_refused_and_merging_is_checked(src, tmp_path, monkeypatch):
  from flax import nnx

  from jaxtele.convert import load_pretrained
  from jaxtele.convert import peft as ours
  from jaxtele.models.lora import add_lora, lora_paths

  model = load_pretrained(src).model
  add_lora(model, rank=4, alpha=8.0, targets="q_proj,v_proj")
  modules, rng = dict(nnx.iter_modules(model)), np.random.default_rng(0)
  for p in lora_paths(model):
    b = modules[p].adapters["default"].lora_b
    b.set_value(rng.normal(0, 0.05, b.shape).astype(np.float32))
  ours.save_adapter(model, str(tmp_path / "adapter"), base_model=src)
  export(str(tmp_path / "adapter"), str(tmp_path / "a2"), "adapter")
  assert certificate(tmp_path / "a2")["checks"]["reload"]["loader"].startswith("peft")
  export(str(tmp_path / "adapter"), str(tmp_path / "merged"), "hf")
  assert certificate(tmp_path / "merged")["checks"]["merged_vs_unmerged"]["status"] == "pass"
  real = ours.adapter_tensors
  monkeypatch.setattr(ours, "adapter_tensors", lambda m, name="default": {
      k: v for k, v in real(m, name).items() if k != "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"})
  refused(tmp_path / "bad", r"^certificate: reload: 1 missing and 0 unexpected keys \(base_model.*layers\.1\.self_attn"
          r"\.v_proj\.lora_B", str(tmp_path / "adapter"), fmt="adapter")


def test_gguf_without_its_chat_template_is_refused(src, tmp_path, monkeypatch):
  import gguf
  import shutil

  export(src, str(tmp_path / "q8"), "gguf", quant="q8_0")
  assert certificate(tmp_path / "q8")["checks"]["logits"]["tolerance"]["precision"] == "q8_0"
  chat = str(tmp_path / "chat_src")
  shutil.copytree(src, chat)
  bpe_tokenizer(TEMPLATE).save_pretrained(chat)
  monkeypatch.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, template: None)
  refused(tmp_path / "bad", r"^certificate: tokenizer: chat template missing", chat, fmt="gguf")


def test_jaxtele_export_with_a_changed_weight_is_refused(src, tmp_path, monkeypatch):
  export(src, str(tmp_path / "ok"), "jaxtele")
  assert certificate(tmp_path / "ok")["checks"]["logits"]["max_abs"] == 0.0
  real = native.save_native

  def nudged(model, folder, tokenizer=None):
    kernel = model.layers[1].mlp.down_proj.kernel
    kernel.set_value(kernel[...] * 1.01)
    real(model, folder, tokenizer)

  monkeypatch.setattr(native, "save_native", nudged)
  refused(tmp_path / "bad", r"^certificate: logits: max \|dlogit\| .* > 1e-05 \(exact\)", src, fmt="jaxtele")


def test_a_missing_library_is_recorded_and_no_verify_says_so(src, tmp_path, monkeypatch, capsys):
  from jaxtele.convert import reload

  real = reload._optional
  monkeypatch.setattr(reload, "_optional", lambda name: None if name == "transformers" else real(name))
  export(src, str(tmp_path / "ours"))
  check = certificate(tmp_path / "ours")["checks"]["reload"]
  assert check["status"] == "skipped" and "transformers not installed" in check["why"]
  main(["--source", src, "--out", str(tmp_path / "nv"), "--no-verify"])
  assert "not verified" in capsys.readouterr().out and certificate(tmp_path / "nv")["passed"] is None


def test_cli_refusal_is_one_line_exit_2(src, tmp_path, monkeypatch, capsys):
  real = hf.to_hf_tensors
  monkeypatch.setattr(hf, "to_hf_tensors", lambda model, dtype=None: {
      k: v * 0 if "down_proj" in k else v for k, v in real(model, dtype).items()})
  with pytest.raises(SystemExit) as e:
    main(["--source", src, "--out", str(tmp_path / "bad")])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "Traceback" not in err
  assert err.splitlines()[-1].startswith("error: certificate: logits:")  # above it: transformers' progress output
  assert not os.path.exists(tmp_path / "bad")


def test_run_exports_carry_certificates_and_a_broken_one_is_refused(lora_export_run, tmp_path, monkeypatch):
  from jaxtele.build import load_run
  from jaxtele.export import export_run

  run = lora_export_run
  cert = certificate(run / "export" / "merged")
  assert cert["passed"] and cert["checks"]["merged_vs_unmerged"]["status"] == "pass"
  cfg, graphdef, params, frozen, tokenizer = load_run(str(run))
  cfg.export.adapter = False  # the shared run also exports an adapter; this test breaks the merged export alone
  real = hf.to_hf_tensors
  monkeypatch.setattr(hf, "to_hf_tensors", lambda model, dtype=None: {
      k: v * 0 if "layers.0.mlp.down_proj" in k else v for k, v in real(model, dtype).items()})
  with pytest.raises(JaxteleError, match="^certificate: logits"):
    export_run(cfg, graphdef, params, frozen, tokenizer, root=str(tmp_path / "export"))
  assert not glob.glob(str(tmp_path / "export" / "*"))
