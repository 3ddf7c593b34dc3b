"""Several adapters on one base: a mixed batch equals each row run alone with its adapter, swapping an adapter's
weights reuses the compiled forward, and N adapters add only their own bytes to the base."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtele.convert import load_pretrained
from jaxtele.convert.peft import load_adapter
from jaxtele.models.adapters import adapter_inputs
from jaxtele.models.lora import add_lora, adapter_names, linears, set_active

TOKENS = np.random.default_rng(0).integers(0, 97, size=(4, 12))


def randomize(model, name, seed):
  rng = np.random.default_rng(seed)
  for lin in linears(model).values():
    if name in lin.adapters:
      b = lin.adapters[name].lora_b
      b.set_value(rng.normal(0, 0.05, b.shape).astype(np.float32))


def three_adapters(base_dir):
  model = load_pretrained(str(base_dir)).model
  add_lora(model, 4, 8.0, targets="all-linear", name="alpha", seed=1)
  add_lora(model, 2, 4.0, targets="q_proj,v_proj", name="beta", seed=2)
  add_lora(model, 4, 8.0, targets="all-linear", name="gamma", seed=3, variant="dora")
  for i, n in enumerate(("alpha", "beta", "gamma")):
    randomize(model, n, i)
  return model


def test_mixed_batch_equals_each_row_alone(tmp_path, make_hf_model, hf_logits):
  make_hf_model("llama_untied").save_pretrained(tmp_path / "base")
  model = three_adapters(tmp_path / "base")
  names = ("alpha", "beta", "gamma")
  ids = jnp.asarray([2, -1, 0, 1], jnp.int32)  # -1: the bare base
  with adapter_inputs(adapter_ids_B=ids, names=names):
    mixed = np.asarray(model(TOKENS))
  import transformers

  base = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float().eval(), TOKENS)
  for row, i in enumerate(np.asarray(ids)):
    set_active(model, None if i < 0 else names[i])
    alone = np.asarray(model(TOKENS[row:row + 1]))[0]
    np.testing.assert_allclose(mixed[row], alone, atol=1e-5)
  np.testing.assert_allclose(mixed[1], base[1], atol=1e-4)  # the base row against transformers
  assert np.abs(mixed[0] - base[0]).max() > 1e-3


def test_swapping_adapter_weights_reuses_the_compiled_forward(tmp_path, make_hf_model, hf_logits):
  import peft
  import torch

  make_hf_model("qwen2_bias").save_pretrained(tmp_path / "base")
  # Two PEFT adapters of the same shapes, different weights.
  import transformers

  for seed in (0, 1):
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
      for n, p in pm.named_parameters():
        if "lora_" in n:
          p.normal_(0, 0.05)
    pm.eval().save_pretrained(str(tmp_path / f"adapter{seed}"))
    np.save(tmp_path / f"want{seed}.npy", hf_logits(pm, TOKENS))
  model = load_pretrained(str(tmp_path / "base")).model
  load_adapter(model, str(tmp_path / "adapter0"), name="served")
  traces = []

  def forward(state, tokens):
    traces.append(1)
    return nnx.merge(graphdef, state)(tokens)

  graphdef, state = nnx.split(model)
  fwd = jax.jit(forward)
  np.testing.assert_allclose(np.asarray(fwd(state, TOKENS)), np.load(tmp_path / "want0.npy"), atol=1e-4)
  load_adapter(model, str(tmp_path / "adapter1"), name="served")  # in place: same shapes
  graphdef2, state = nnx.split(model)
  assert graphdef2 == graphdef
  np.testing.assert_allclose(np.asarray(fwd(state, TOKENS)), np.load(tmp_path / "want1.npy"), atol=1e-4)
  assert len(traces) == 1  # one trace, one compile for both adapters
  assert fwd._cache_size() == 1


def test_n_adapters_add_only_their_bytes(tmp_path, make_hf_model):
  make_hf_model("llama_untied").save_pretrained(tmp_path / "base")
  model = load_pretrained(str(tmp_path / "base")).model
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  base_bytes = nbytes(nnx.state(model))
  expected = 0
  for i in range(3):
    paths = add_lora(model, 4, 8.0, name=f"a{i}", seed=i)
    # Independent count: A [I, 4] + B [4, O] in fp32 per adapted linear.
    expected += sum(4 * 4 * sum(linears(model)[p].shape) for p in paths)
  assert adapter_names(model) == ["a0", "a1", "a2"]
  assert nbytes(nnx.state(model)) == base_bytes + expected
  assert nbytes(nnx.state(model, nnx.LoRAParam)) == expected
  # The kernels are shared, not copied: one kernel leaf per linear.
  assert len(jax.tree.leaves(nnx.state(model, lambda p, v: p[-1] == "kernel"))) == len(linears(model))
