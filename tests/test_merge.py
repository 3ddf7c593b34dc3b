"""Adapter merging: identity for every variant, linearity against hand-computed deltas, TIES and DARE against
their published definitions on hand-made tensors and against peft (`merge_utils`, `add_weighted_adapter`)."""

import json

import numpy as np
import pytest
import transformers
from flax import nnx

from jaxtele.convert import load_pretrained
from jaxtele.convert.peft import save_adapter
from jaxtele.errors import JaxteleError
from jaxtele.models import merge
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import init_model
from jaxtele.models.lora import add_lora, linears, lora_paths, set_active

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 12))


def randomize(model, name, seed):
  """Non-zero B (and a moved DoRA magnitude), so each adapter changes the model."""
  rng = np.random.default_rng(seed)
  mods = dict(nnx.iter_modules(model))
  for p in lora_paths(model, name):
    ad = mods[p].adapters[name]
    ad.lora_b.set_value(ad.lora_b[...] + rng.normal(0, 0.05, ad.lora_b.shape).astype(np.float32))
    if hasattr(ad, "lora_magnitude"):
      ad.lora_magnitude.set_value(ad.lora_magnitude[...] * (1 + rng.normal(0, 0.1, ad.lora_magnitude.shape)))


def leaves(adapter) -> dict:
  return {k: np.asarray(v[...]) for k, v in vars(adapter).items() if isinstance(v, nnx.Variable) and v is not None
          and getattr(v, "shape", None) is not None}


@pytest.mark.parametrize("variant,rslora,method", [("lora", False, "linear"), ("lora", True, "linear"),
                                                   ("dora", False, "linear"), ("pissa", False, "linear"),
                                                   ("dora", False, "ties"), ("pissa", False, "dare")])
def test_one_adapter_at_weight_one_is_returned_exactly(variant, rslora, method):
  model = init_model(TINY)
  add_lora(model, 4, 8.0, rslora=rslora, variant=variant, name="x")
  randomize(model, "x", 0)
  merge.merge_adapters(model, ["x"], [1.0], method, out="m")
  for lin in linears(model).values():
    x, m = lin.adapters["x"], lin.adapters["m"]
    assert type(x) is type(m) and x.scale == m.scale and x.dropout == m.dropout
    lx, lm = leaves(x), leaves(m)
    assert sorted(lx) == sorted(lm)
    for k in lx:
      assert np.array_equal(lx[k], lm[k]), k  # bit for bit


def hand_delta(model, name):
  """s * A @ B per layer, from the leaves, in float64 (plain LoRA)."""
  out = {}
  for p, lin in linears(model).items():
    if name in lin.adapters:
      ad = lin.adapters[name]
      out[p] = ad.scale * np.asarray(ad.lora_a[...], np.float64) @ np.asarray(ad.lora_b[...], np.float64)
  return out


def test_linear_is_the_weighted_sum_of_deltas():
  """Ranks, scales (rsLoRA) and targets differ; the merged adapter's forward = W + sum w_i dW_i by hand."""
  model = init_model(TINY)
  add_lora(model, 4, 8.0, targets="q_proj,v_proj", name="a")
  add_lora(model, 2, 16.0, rslora=True, targets="v_proj,down_proj", name="b", seed=1)
  randomize(model, "a", 0)
  randomize(model, "b", 1)
  da, db = hand_delta(model, "a"), hand_delta(model, "b")
  for wa, wb in ((0.3, 0.7), (1.0, -0.5)):
    merge.merge_adapters(model, ["a", "b"], [wa, wb], "linear", out="m")
    assert set(lora_paths(model, "m")) == set(da) | set(db)
    for p in lora_paths(model, "m"):  # the merged adapter's own delta
      m = linears(model)[p].adapters["m"]
      got = m.scale * np.asarray(m.lora_a[...], np.float64) @ np.asarray(m.lora_b[...], np.float64)
      np.testing.assert_allclose(got, wa * da.get(p, 0) + wb * db.get(p, 0), atol=1e-6)
    deltas = merge.merged_deltas(model, ["a", "b"], [wa, wb], "linear")  # what a merged model adds
    for p, d in deltas.items():
      np.testing.assert_allclose(d, wa * da.get(p, 0) + wb * db.get(p, 0), atol=1e-6)
  set_active(model, "m")  # its forward = the base with kernels changed by hand
  ref = init_model(TINY)
  for p, lin in linears(ref).items():
    lin.kernel.set_value((np.asarray(lin.kernel[...], np.float64) + da.get(p, 0) - 0.5 * db.get(p, 0)
                          ).astype(np.float32))
  np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(ref(TOKENS)), atol=2e-5)


def test_pissa_linear_weights_the_delta_from_the_original_base():
  model = init_model(TINY)
  w0 = {p: np.asarray(m.kernel[...], np.float64) for p, m in linears(model).items()}
  add_lora(model, 4, 8.0, variant="pissa", name="x")
  randomize(model, "x", 0)
  merge.merge_adapters(model, ["x"], [0.5], "linear", out="m")
  for p, lin in linears(model).items():
    x = lin.adapters["x"]
    full = np.asarray(lin.kernel[...], np.float64) + x.scale * np.asarray(x.lora_a[...], np.float64) @ \
        np.asarray(x.lora_b[...], np.float64)
    want = w0[p] + 0.5 * (full - w0[p])
    got = np.asarray(lin.adapters["m"].merged_kernel(lin.kernel[...]), np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_ties_and_dare_follow_their_definitions_on_hand_made_tensors():
  t1, t2, t3 = np.array([3, -1, 0.5, -4.]), np.array([-2, -2, 1, 1.]), np.array([1, 3, -0.2, -1.5])
  # density 0.5 keeps 2 of 4: [3,0,0,-4], [-2,-2,0,0], [0,3,0,-1.5]; mass [1,1,0,-5.5] -> signs [+,+,+,-];
  # agreeing entries averaged: [3/1, 3/1, none -> 0, (-4 - 1.5)/2]
  np.testing.assert_allclose(merge.ties([t1, t2, t3], [1, 1, 1], 0.5), [3, 3, 0, -2.75])
  # weights scale the entries, not the election: mass of [1,2,0.5]-weighted ones is not what elects
  np.testing.assert_allclose(merge.ties([t1, t2, t3], [1, 2, 0.5], 0.5), [3, 1.5, 0, (-4 - 0.75) / 2])
  big = np.arange(1, 20001, dtype=np.float64)
  out = merge.dare([big], [1.0], 0.3, seed=7)
  kept = out != 0
  np.testing.assert_allclose(out[kept], big[kept] / 0.7)  # rescaled by 1 / (1 - p)
  assert abs((~kept).mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / big.size)  # dropped with probability p
  assert np.array_equal(out, merge.dare([big], [1.0], 0.3, seed=7))  # seeded
  assert not np.array_equal(out, merge.dare([big], [1.0], 0.3, seed=8))


def test_ties_and_dare_equal_peft_merge_utils():
  import torch
  from peft.utils import merge_utils

  rng = np.random.default_rng(0)
  ts = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3)]
  w = [0.5, 1.0, 0.25]
  theirs = merge_utils.ties([torch.tensor(t) for t in ts], torch.tensor(w), 0.4).numpy()
  np.testing.assert_allclose(merge.ties(ts, w, 0.4), theirs, rtol=1e-6, atol=1e-7)
  # DARE's masks come from different generators; with nothing dropped both are the weighted sum
  theirs = merge_utils.dare_linear([torch.tensor(t) for t in ts], torch.tensor(w), 1.0).numpy()
  np.testing.assert_allclose(merge.dare(ts, w, 0.0), theirs, rtol=1e-6)


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, make_hf_model):
  """An HF base and two PEFT adapters (rank 4 on q,v; rank 2 rsLoRA on v, o) written by jaxtele."""
  root = tmp_path_factory.mktemp("merge")
  make_hf_model("llama_untied").save_pretrained(root / "base")
  folders = []
  for i, (rank, rslora, targets) in enumerate(((4, False, "q_proj,v_proj"), (2, True, "v_proj,o_proj"))):
    model = load_pretrained(str(root / "base")).model
    add_lora(model, rank, 8.0, rslora=rslora, targets=targets, seed=i)
    randomize(model, "default", i)
    save_adapter(model, str(root / f"a{i}"), rslora=rslora, base_model=str(root / "base"))
    folders.append(str(root / f"a{i}"))
  return root, folders


def test_cli_merge_matches_peft(two_adapters, hf_logits, capsys):
  """linear = peft's `cat` (exact concatenation); ties into a model = W + peft's `merge_utils.ties` of peft's own
  delta weights, layer by layer."""
  import peft
  import torch
  from peft.utils import merge_utils

  from jaxtele.export import main

  root, (a0, a1) = two_adapters
  main(["--merge-adapters", f"{a0},{a1}", "--weights", "0.3,0.7", "--out", str(root / "lin")])
  main(["--merge-adapters", f"{a0},{a1}", "--weights", "0.5,1.0", "--method", "ties", "--density", "0.5",
        "--format", "hf", "--out", str(root / "ties")])
  tokens = np.random.default_rng(1).integers(0, 97, size=(2, 12))
  base = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base")).float().eval()
  pm = peft.PeftModel.from_pretrained(base, a0, adapter_name="a0")
  pm.load_adapter(a1, adapter_name="a1")
  pm.add_weighted_adapter(["a0", "a1"], [0.3, 0.7], "cat", combination_type="cat")
  ours = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(str(root / "base")).float().eval(), str(root / "lin"))
  pm.set_adapter("cat")
  np.testing.assert_allclose(hf_logits(ours.eval(), tokens), hf_logits(pm.eval(), tokens), atol=1e-4)
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(root / "base")).float().eval()
  refs = dict(ref.named_modules())
  with torch.no_grad():
    for name, mod in pm.base_model.model.named_modules():
      if hasattr(mod, "lora_A") and ("a0" in mod.lora_A or "a1" in mod.lora_A):
        names = [n for n in ("a0", "a1") if n in mod.lora_A]
        w = torch.tensor([{"a0": 0.5, "a1": 1.0}[n] for n in names])
        refs[name].weight += merge_utils.ties([mod.get_delta_weight(n) for n in names], w, 0.5)
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(root / "ties")).float().eval()
  np.testing.assert_allclose(hf_logits(merged, tokens), hf_logits(ref, tokens), atol=1e-4)
  for folder in ("lin", "ties"):  # each merged export was reloaded by peft / transformers and certified
    cert = json.load(open(root / folder / "certificate.json"))
    assert cert["passed"] and cert["checks"]["reload"]["status"] == "pass"
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    main(["--merge-adapters", f"{a0},{a1}", "--weights", "0.3", "--out", str(root / "bad")])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.strip() == "error: --weights: 1 weights for 2 adapters"
  assert not (root / "bad").exists()


def test_bad_requests_are_one_line_errors():
  model = init_model(TINY)
  add_lora(model, 4, 8.0, name="a")
  add_lora(model, 4, 8.0, variant="dora", targets="q_proj", name="b")
  with pytest.raises(JaxteleError, match="unknown merge method 'mean'"):
    merge.merge_adapters(model, ["a"], [1.0], "mean")
  with pytest.raises(JaxteleError, match="adapter 'zz': not loaded"):
    merge.merge_adapters(model, ["a", "zz"], [0.5, 0.5])
  with pytest.raises(JaxteleError, match="different variants"):
    merge.merge_adapters(model, ["a", "b"], [0.5, 0.5])
