"""Embeddings and head trained beside LoRA adapters: PEFT `modules_to_save` out (peft loads it, same logits)
and in, tied pairs kept as one tensor, their own learning rate, the trainable table, and unmatched targets."""

import jax
import ml_collections
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxtele.convert import hf, load_pretrained
from jaxtele.convert.peft import load_adapter, read_config, save_adapter
from jaxtele.errors import JaxteleError
from jaxtele.build import lora_extra, saved_modules
from jaxtele.models.lora import add_lora, check_extra, lora_paths, merge_lora, trainable_filter, trainable_table
from jaxtele.optimizer import make_optimizer
from jaxtele.step import init_state, make_train_step

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 16))


def perturbed_lora_model(folder, modules, seed=0):
  """The base at `folder` with a random q/v adapter and random changes to the modules trained whole."""
  model = load_pretrained(str(folder)).model
  add_lora(model, rank=4, alpha=8.0, targets="q_proj,v_proj")
  rng = np.random.default_rng(seed)
  mods = dict(nnx.iter_modules(model))
  for p in lora_paths(model):
    b = mods[p].adapters["default"].lora_b
    b.set_value(rng.normal(0, 0.05, b.shape).astype(np.float32))
  for var in ([model.embed_tokens.embedding] if "embed_tokens" in modules else []) + \
             ([model.lm_head.kernel] if "lm_head" in modules else []):
    var.set_value(var[...] + rng.normal(0, 0.05, var.shape).astype(np.float32))
  return model


@pytest.mark.parametrize("name,train_embeddings,train_head", [("llama_tied", False, True),
                                                              ("llama_untied", True, True)])
def test_peft_loads_modules_to_save_with_the_same_logits(tmp_path, make_hf_model, hf_logits, name,
                                                         train_embeddings, train_head):
  import peft

  ref = make_hf_model(name)
  ref.save_pretrained(tmp_path / "base")
  tied = ref.config.tie_word_embeddings
  lora_cfg = ml_collections.ConfigDict({"train_embeddings": train_embeddings, "train_head": train_head})
  modules = saved_modules(lora_cfg, tied)
  assert modules == (["embed_tokens"] if tied else ["embed_tokens", "lm_head"])
  model = perturbed_lora_model(tmp_path / "base", modules)
  ours = np.asarray(model(TOKENS))
  save_adapter(model, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"), modules_to_save=modules)
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float().eval()
  theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  np.testing.assert_allclose(hf_logits(theirs, TOKENS), ours, atol=1e-4)
  if tied:  # PEFT kept the pair tied: its head is its (trained) embedding
    inner = theirs.base_model.model
    np.testing.assert_array_equal(inner.lm_head.weight.detach().numpy(),
                                  inner.model.embed_tokens.weight.detach().numpy())
  # ... and back: onto a fresh base, with the same logits; a tied base stays tied (one tensor)
  again = load_adapter(load_pretrained(str(tmp_path / "base")).model, str(tmp_path / "adapter"))
  assert (again.lm_head is None) == tied
  np.testing.assert_allclose(np.asarray(again(TOKENS)), ours, atol=1e-5)
  hf.save_hf(merge_lora(again), str(tmp_path / "merged"))
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
  assert merged.config.tie_word_embeddings == tied
  np.testing.assert_allclose(hf_logits(merged, TOKENS), ours, atol=1e-4)


def test_peft_own_adapter_with_modules_to_save_imports(tmp_path, make_hf_model, hf_logits):
  """An adapter PEFT wrote itself (tied base, ensure_weight_tying) imports with PEFT's logits."""
  import peft
  import torch

  ref = make_hf_model("llama_tied")
  ref.save_pretrained(tmp_path / "base")
  pm = peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                ensure_weight_tying=True))
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_B" in n or "modules_to_save" in n:
        p.add_(0.05 * torch.randn_like(p))
  pm.save_pretrained(tmp_path / "adapter")
  theirs = hf_logits(pm.eval(), TOKENS)
  assert read_config(str(tmp_path / "adapter"))["modules_to_save"] == ["embed_tokens"]
  ours = load_adapter(load_pretrained(str(tmp_path / "base")).model, str(tmp_path / "adapter"))
  np.testing.assert_allclose(np.asarray(ours(TOKENS)), theirs, atol=1e-4)


def test_untied_head_on_a_tied_base_is_refused(tmp_path, make_hf_model):
  import peft
  import torch

  ref = make_hf_model("llama_tied")
  ref.save_pretrained(tmp_path / "base")
  pm = peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
  with torch.no_grad():
    pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
  pm.save_pretrained(tmp_path / "adapter")
  with pytest.raises(JaxteleError, match="never unties"):
    load_adapter(load_pretrained(str(tmp_path / "base")).model, str(tmp_path / "adapter"))


def test_embedding_lr_and_table_and_unmatched_extra():
  from jaxtele.models.config import ModelConfig
  from jaxtele.models.decoder import init_model

  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=8, tie_word_embeddings=True)
  lora_cfg = ml_collections.ConfigDict({"train_head": True, "extra_trainable": ""})
  extra = lora_extra(lora_cfg, tied=True)
  model = init_model(cfg)
  add_lora(model, 4, 8.0)
  graphdef, params, frozen = nnx.split(model, trainable_filter("lora", extra), ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  assert "embedding" in params["embed_tokens"]  # the tied head trains as the one embedding tensor
  rows = {r.split()[0]: r.split()[1:3] for r in trainable_table(params, frozen, tied=True)[1:]}
  assert rows["embeddings"] == [f"{64 * 32:,}", "0"] and rows["head"] == ["0", "0"]
  # r (in + out) per linear: q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32
  assert rows["adapters"] == [f"{4 * (64 + 48 + 48 + 64 + 96 + 96 + 96):,}", "0"]
  assert rows["norms"] == ["0", f"{3 * 32:,}"]
  # First Adam step: update = -rate * g / (|g| + eps) (bias-corrected), so embeddings move 10x the others
  opt = ml_collections.ConfigDict(dict(lr=1e-3, schedule="constant", warmup_ratio=0.0, final_lr_ratio=1.0,
                                       weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-12, clip=0.0))
  batch = {k: jax.numpy.asarray(v, jax.numpy.int32) for k, v in
           dict(tokens=np.arange(16).reshape(2, 8), targets=np.arange(1, 17).reshape(2, 8),
                segment_ids=np.ones((2, 8)), positions=np.tile(np.arange(8), (2, 1)),
                loss_mask=np.ones((2, 8))).items()}
  tx, _ = make_optimizer(opt, 10, embedding_lr=1e-2)
  new, _ = jax.jit(make_train_step(graphdef, tx, 1))(init_state(params, tx), frozen, batch)
  d_emb = np.asarray(new["params"]["embed_tokens"]["embedding"] - params["embed_tokens"]["embedding"])
  moved = np.abs(d_emb)[np.abs(d_emb) > 0]
  np.testing.assert_allclose(moved, 1e-2, rtol=1e-4)
  path = lambda t: t["layers"][0]["self_attn"]["q_proj"]["adapters"]["default"]["lora_b"]  # B = 0: A has no grad
  d_b = np.abs(np.asarray(path(new["params"]) - path(params)))
  assert d_b.size and (d_b > 0).mean() > 0.9
  np.testing.assert_allclose(d_b[d_b > 0], 1e-3, rtol=1e-4)
  with pytest.raises(JaxteleError, match="^extra: 're_nothing' matches no parameter"):  # the run names its key
    check_extra(model, "re_nothing")


def test_a_lora_run_trains_the_tied_embedding_and_prints_what_trains(tiny, capsys):
  from jaxtele.train import run

  cfg = tiny("--config.train.mode=lora", "--config.lora.rank=4", "--config.lora.train_head=True",
             "--config.lora.embedding_lr=1e-2", "--config.train.steps=2", "--config.eval.max_batches=1",
             "--config.export.adapter=True")
  res = run(cfg)
  config = read_config(str(cfg.run_dir) + "/export/adapter")  # the tied embedding travels as modules_to_save
  assert config["modules_to_save"] == ["embed_tokens"] and config["ensure_weight_tying"] is True
  err = capsys.readouterr().err
  table = err[err.index("group"):].splitlines()[:6]
  assert [r.split()[0] for r in table] == ["group", "adapters", "embeddings", "head", "norms", "base"]
  assert table[2].split()[1] == f"{264 * 32:,}" and "tied" in table[2]  # the one tied tensor, trained
  assert table[3].split()[1:3] == ["0", "0"]  # no separate head exists
  assert set(res["state"]["params"]) >= {"embed_tokens", "layers"} and "lm_head" not in res["state"]["params"]
  with pytest.raises(JaxteleError, match="lora.extra_trainable: 'nothing_here' matches no parameter"):
    run(tiny("--config.train.mode=lora", "--config.lora.extra_trainable=nothing_here"))
