"""Every adapter variant (lora, rslora, dora, pissa) against `peft` + `transformers` on random tiny Llama and
Qwen2 models: our export loads into PEFT with the same logits (adapted and merged, both sides), a PEFT-made
adapter imported here gives PEFT's logits, and merge -> unmerge gives the base back bit for bit."""

import numpy as np
import pytest
import torch
import transformers

from jaxtele.convert import hf, load_pretrained
from jaxtele.convert.peft import load_adapter, save_adapter
from jaxtele.models.lora import add_lora, linears, lora_paths, merge_lora, unmerge_lora

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))
VARIANTS = {"lora": dict(variant="lora"), "rslora": dict(variant="lora", rslora=True), "dora": dict(variant="dora"),
            "pissa": dict(variant="pissa")}
TOL = 1e-4


def randomize(model, seed=0):
  """Non-zero adapters: B (zero at init) gets values, A and DoRA's magnitude move off their init."""
  rng = np.random.default_rng(seed)
  for lin in linears(model).values():
    for a in lin.adapters.values():
      a.lora_a.set_value(np.asarray(a.lora_a[...]) + rng.normal(0, 0.05, a.lora_a.shape).astype(np.float32))
      a.lora_b.set_value(np.asarray(a.lora_b[...]) + rng.normal(0, 0.05, a.lora_b.shape).astype(np.float32))
      if hasattr(a, "lora_magnitude"):
        m = np.asarray(a.lora_magnitude[...])
        a.lora_magnitude.set_value(m * rng.uniform(0.8, 1.2, m.shape).astype(np.float32))


def ours_adapted(tmp_path, family, variant):
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float().eval()
  model = load_pretrained(str(tmp_path / "base")).model
  add_lora(model, rank=4, alpha=8.0, targets="all-linear", seed=1, **VARIANTS[variant])
  randomize(model)
  return ref, model


@pytest.fixture(scope="module", params=["llama_untied", "qwen2_bias"])
def base_dir(request, tmp_path_factory, make_hf_model):
  d = tmp_path_factory.mktemp(request.param)
  make_hf_model(request.param).save_pretrained(d / "base")
  return d


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_adapter_in_peft_gives_our_logits(base_dir, variant, hf_logits, tmp_path):
  import peft

  ref, model = ours_adapted(base_dir, None, variant)
  ours = np.asarray(model(TOKENS))
  assert np.abs(ours - hf_logits(ref, TOKENS)).max() > 1e-3  # the adapter matters
  save_adapter(model, str(tmp_path / "adapter"), rslora=VARIANTS[variant].get("rslora", False))
  theirs = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()  # raises on missing/unexpected
  assert sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A")) == len(lora_paths(model))
  assert all(m.use_dora["default"] == (variant == "dora") for n, m in theirs.named_modules() if hasattr(m, "use_dora"))
  err = np.abs(hf_logits(theirs, TOKENS) - ours).max()
  assert err < TOL, err
  merged_theirs = theirs.merge_and_unload()
  merge_lora(model)
  hf.save_hf(model, str(tmp_path / "merged"))
  merged_ours = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
  assert np.abs(hf_logits(merged_theirs, TOKENS) - ours).max() < TOL
  assert np.abs(hf_logits(merged_ours, TOKENS) - ours).max() < TOL


def peft_config(variant, **kw):
  import peft

  return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=variant == "rslora",
                         use_dora=variant == "dora", init_lora_weights="pissa" if variant == "pissa" else True, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_imported_gives_peft_logits(base_dir, variant, hf_logits, tmp_path):
  """PiSSA: PEFT converts it to a plain LoRA against the original base on save, which we import."""
  import peft

  base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir / "base")).float().eval()
  base_logits = hf_logits(base, TOKENS)  # before peft wraps `base` in place
  if variant == "pissa":
    init = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(base_dir / "base")).float(),
                               peft_config(variant))
    init.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter saved as plain LoRA
    init.save_pretrained(str(tmp_path / "init"))
    init.peft_config["default"].init_lora_weights = "pissa"
    theirs = init
  else:
    theirs = peft.get_peft_model(base, peft_config(variant))
  torch.manual_seed(0)
  with torch.no_grad():
    for n, p in theirs.named_parameters():
      if "lora_B" in n or "lora_A" in n:
        p.add_(torch.randn_like(p) * 0.05)
      elif "lora_magnitude" in n:
        p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
  theirs.eval()
  want = hf_logits(theirs, TOKENS)
  kw = {"path_initial_model_for_weight_conversion": str(tmp_path / "init")} if variant == "pissa" else {}
  theirs.save_pretrained(str(tmp_path / "adapter"), **kw)
  model = load_pretrained(str(base_dir / "base")).model
  load_adapter(model, str(tmp_path / "adapter"))
  err = np.abs(np.asarray(model(TOKENS)) - want).max()
  assert err < TOL, err
  assert np.abs(want - base_logits).max() > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_merge_then_unmerge_restores_the_base_bit_for_bit(base_dir, variant, param_dtype):
  model = load_pretrained(str(base_dir / "base"), param_dtype=param_dtype).model
  add_lora(model, rank=4, alpha=8.0, **VARIANTS[variant])
  randomize(model)
  before = {p: np.asarray(m.kernel[...]) for p, m in linears(model).items()}
  adapted = np.asarray(model(TOKENS))
  merge_lora(model, keep=True)
  assert any(not np.array_equal(np.asarray(m.kernel[...], np.float32), before[p].astype(np.float32))
             for p, m in linears(model).items())
  # Merged in fp32: the same function as the adapted model (bf16 params, fp32 compute).
  assert np.abs(np.asarray(model(TOKENS)) - adapted).max() < 1e-4
  unmerge_lora(model)
  for p, m in linears(model).items():
    k = np.asarray(m.kernel[...])
    assert k.dtype == before[p].dtype and np.array_equal(k, before[p])
  assert np.array_equal(np.asarray(model(TOKENS)), adapted)
