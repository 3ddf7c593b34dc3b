"""The run directory's one home (run.py) and the one model-source resolver (source.py): each source kind, each
error in one line, and `generate` on a run directory and on a PEFT adapter against `transformers` / `peft`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxtele import source
from jaxtele.errors import JaxteleError
from jaxtele.run import RunDir


def one_line(e):
  assert "\n" not in str(e.value), str(e.value)


def fake_run(folder, steps, config=None):
  """A run directory by hand: step folders holding only their JSON meta."""
  for s in steps:
    os.makedirs(folder / "checkpoints" / str(s) / "meta", exist_ok=True)
    (folder / "checkpoints" / str(s) / "meta" / "metadata").write_text(json.dumps({"config": config or {}}))
  os.makedirs(folder / "checkpoints" / "9.orbax-checkpoint-tmp-1", exist_ok=True)  # a save in progress
  return folder


def test_layout_steps_and_errors(tmp_path):
  run = RunDir(fake_run(tmp_path / "run", [3, 12, 6]))
  assert run.steps() == [3, 6, 12] and run.latest_step() == 12 and run.step() == 12 and run.step(6) == 6
  assert run.metrics == str(tmp_path / "run" / "metrics.jsonl")
  assert run.checkpoints == str(tmp_path / "run" / "checkpoints")
  with pytest.raises(JaxteleError, match=r"checkpoints: no step 5 \(saved: 3, 6, 12\)") as e:
    run.step(5)
  one_line(e)
  with pytest.raises(JaxteleError, match=r"empty/checkpoints: no checkpoint") as e:
    RunDir(tmp_path / "empty").step()
  (tmp_path / "run" / "checkpoints" / "12" / "meta" / "metadata").write_text('{"config":\n oops}')
  with pytest.raises(JaxteleError, match=r"checkpoints/12/meta/metadata:2: malformed JSON") as e:
    run.config()
  one_line(e)
  assert run.latest_config() is not None  # the report falls back to the newest meta that reads (step 6)


def test_an_older_runs_config_is_brought_up_to_date(tmp_path):
  """A config stored before later keys existed reads them as today's defaults; what it stored is kept, also a key
  the defaults no longer have."""
  stored = {"train": {"mode": "lora", "steps": 7}, "lora": {"rank": 2}, "retired": {"key": 1}}
  cfg = RunDir(fake_run(tmp_path / "old", [1], stored)).config()
  assert (cfg.train.mode, cfg.train.steps, cfg.lora.rank) == ("lora", 7, 2)
  # Defaults written out by hand (config.py): keys this run never stored.
  assert cfg.lora.train_embeddings is False and cfg.lora.quantize_base == "none" and cfg.lora.variant == "lora"
  assert cfg.train.forgetting_budget == 0.0 and cfg.model.scan_layers is False and cfg.export.verify is True
  assert cfg.retired.key == 1


def test_report_on_a_run_without_metrics_is_one_error_line(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text("")
  p = subprocess.run([sys.executable, "-m", "jaxtele.run_report", str(tmp_path / "run"), "--out", str(tmp_path / "out")],
                     capture_output=True, text=True, timeout=300)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1 and "metrics.jsonl: empty" in lines[0], p.stderr
  assert p.stdout == "" and not (tmp_path / "out" / "report.md").exists()


# --- The resolver: which kind a path is, from the file system alone. ---

@pytest.fixture
def folders(tmp_path):
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  native = tmp_path / "native"
  (native / "params").mkdir(parents=True)
  (native / "config.json").write_text("{}")
  adapter = tmp_path / "adapter"
  adapter.mkdir()
  (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(hf)}))
  gguf = tmp_path / "m.gguf"
  gguf.write_bytes(b"GGUF")
  return {"hf": hf, "jaxtele": native, "peft": adapter, "gguf": gguf, "run": fake_run(tmp_path / "run", [2, 4])}


def test_each_kind_is_recognised(folders):
  for kind, path in folders.items():
    assert source.resolve(str(path)).kind == kind
  assert source.resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
  run = source.resolve(str(folders["run"]))
  assert run.step == 4 and source.resolve(str(folders["run"]), step=2).step == 2
  peft = source.resolve(str(folders["peft"]))
  assert peft.base == str(folders["hf"])  # the adapter's own base_model_name_or_path
  assert source.resolve(str(folders["peft"]), base="elsewhere/base").base == "elsewhere/base"


@pytest.mark.parametrize("make,message", [
    (lambda t: t / "nope", r"nope: no such model folder"),
    (lambda t: t / "x.gguf", r"x.gguf: no such GGUF file"),
    (lambda t: (t / "f.txt").write_text("x") and t / "f.txt", r"f.txt: not a model folder"),
])
def test_missing_sources(tmp_path, make, message):
  with pytest.raises(JaxteleError, match=message) as e:
    source.resolve(str(make(tmp_path)))
  one_line(e)


def test_a_folder_of_no_kind_says_what_it_lacks_for_each(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(JaxteleError, match=r"empty: not a model source: no adapter_config.json \(a PEFT adapter\), no "
                     r"checkpoints/ \(a run directory\), no config.json \(an HF or jaxtele folder\)") as e:
    source.resolve(str(tmp_path / "empty"))
  one_line(e)
  (tmp_path / "empty" / "checkpoints").mkdir()  # a run killed before its first save
  with pytest.raises(JaxteleError, match=r"checkpoints/ holds no complete step \(a run directory\)"):
    source.resolve(str(tmp_path / "empty"))


def test_step_and_base_only_where_they_mean_something(folders, tmp_path):
  with pytest.raises(JaxteleError, match=r"--step: only for a run directory \(.*hf is a hf source\)") as e:
    source.resolve(str(folders["hf"]), step=3)
  one_line(e)
  with pytest.raises(JaxteleError, match=r"model.base: only for a PEFT adapter source") as e:
    source.resolve(str(folders["run"]), base="x/y", flags=source.Flags("model.source", "model.step", "model.base"))
  with pytest.raises(JaxteleError, match=r"checkpoints: no step 3 \(saved: 2, 4\)"):
    source.resolve(str(folders["run"]), step=3)
  (folders["peft"] / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
  with pytest.raises(JaxteleError, match=r"adapter: the adapter names no base model; pass --base") as e:
    source.resolve(str(folders["peft"]))
  one_line(e)


def test_diagnose_wants_a_run_directory(folders, capsys):
  from jaxtele.eval.diagnose import main

  with pytest.raises(SystemExit) as e:
    main([str(folders["hf"])])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and "\n" not in err and "hf: a hf source, not a run directory" in err, err


def test_export_of_an_empty_folder_with_a_base_names_what_it_lacks(tmp_path, folders):
  (tmp_path / "EMPTY").mkdir()
  p = subprocess.run([sys.executable, "-m", "jaxtele.export", "--source", str(tmp_path / "EMPTY"), "--base",
                      str(folders["hf"]), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and len(lines) == 1, p.stderr
  assert "EMPTY: not a model source: no adapter_config.json (a PEFT adapter), no checkpoints/" in lines[0]
  assert not (tmp_path / "out").exists()


# --- Checkpoint items: parameters, optimizer state and step apart; a step of the older single-item layout. ---

def test_a_step_of_the_single_item_layout_is_read_and_resumed(tmp_path):
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from jaxtele.checkpoint import Checkpointer, saved_params

  w, mu = np.arange(6, dtype=np.float32).reshape(2, 3), np.full((2, 3), 0.25, np.float32)
  state = {"step": jnp.asarray(4, jnp.int32), "params": {"w": jnp.asarray(w)}, "opt_state": {"mu": jnp.asarray(mu)}}
  meta = {"mode": "full", "config": {}}
  old = ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints"), item_names=("state", "meta"),
                              options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
  old.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  old.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with Checkpointer(str(tmp_path / "run"), keep=3, async_save=False) as ckpt:
    assert ckpt.legacy(4)
    assert np.array_equal(ckpt.restore_params(4, {"w": w})["w"], w)  # the params subtree alone
    back = ckpt.restore(4, abstract, None, meta)
    assert int(back["step"]) == 4 and np.array_equal(back["opt_state"]["mu"], mu)
    ckpt.manager.save(5, args=ocp.args.Composite(**{  # the next save writes the new items (no data item here)
        "params": ocp.args.StandardSave(back["params"]), "opt_state": ocp.args.StandardSave(back["opt_state"]),
        "step": ocp.args.JsonSave({"step": 5}), "meta": ocp.args.JsonSave(meta)}))
    ckpt.wait()
    assert not ckpt.legacy(5)
    items = set(os.listdir(os.path.join(ckpt.directory, "5")))
    assert {"meta", "opt_state", "params", "step"} <= items and "state" not in items
    again = ckpt.restore(5, abstract, None, meta)
    assert int(again["step"]) == 5 and np.array_equal(again["params"]["w"], w)
  assert np.array_equal(saved_params(str(tmp_path / "run"), 4)["w"], w)
  assert np.array_equal(saved_params(str(tmp_path / "run"), 5)["w"], w)


# --- generate on the kinds it did not accept before: a run directory and a PEFT adapter. ---

def generated(capsys, *args) -> str:
  """What `python -m jaxtele.eval.generate` prints: ids without a tokenizer, else the decoded text."""
  from jaxtele.eval.generate import main

  main([*args, "--ids", "5,6,7,8", "--max-new-tokens", "12"])
  return capsys.readouterr().out.removesuffix("\n")  # print's own newline


def torch_greedy(model, n=12, eos=None) -> list[int]:
  import torch

  with torch.no_grad():
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)
  return out[0, 4:].tolist()


def test_generate_on_a_peft_adapter_equals_peft(tmp_path, make_hf_model, capsys):
  import peft
  import torch
  import transformers
  from flax import nnx

  from jaxtele.convert import load_pretrained
  from jaxtele.convert.peft import save_adapter
  from jaxtele.models.lora import add_lora, lora_paths

  ref = make_hf_model("llama_untied", seed=3)
  with torch.no_grad():  # sharper weights: greedy paths that vary, far from ties
    for name, p in ref.named_parameters():
      if "norm" not in name:
        p.mul_(6.0)
  ref.save_pretrained(tmp_path / "base")
  model = load_pretrained(str(tmp_path / "base")).model
  add_lora(model, rank=4, alpha=8.0, targets="all-linear")
  rng, modules = np.random.default_rng(0), dict(nnx.iter_modules(model))
  for path in lora_paths(model):
    b = modules[path].adapters["default"].lora_b
    b.set_value(rng.normal(0, 0.5, b.shape).astype(np.float32))
  save_adapter(model, str(tmp_path / "adapter"), rank=4, alpha=8.0, base_model=str(tmp_path / "base"))
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).float().eval()
  want = torch_greedy(peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval())
  assert want != torch_greedy(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval())
  assert generated(capsys, "--model", str(tmp_path / "adapter")) == ",".join(map(str, want))


def test_generate_on_a_run_directory_equals_its_merged_export(tiny, workdir, capsys, monkeypatch):
  import transformers

  from jaxtele import optimizer
  from jaxtele.data.byte_tokenizer import byte_tokenizer
  from jaxtele.train import run

  run(tiny("--config.train.mode=lora", "--config.lora.rank=4", "--config.export.merged=True",
           "--config.export.verify=False"))
  monkeypatch.setattr(optimizer, "run_optimizer", None)  # parameters restore alone: no optimizer is built
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(workdir / "run" / "export" / "merged")).eval()
  tok = byte_tokenizer()
  want = tok.decode(torch_greedy(merged, eos=tok.eos_token_id), skip_special_tokens=True)
  assert want and generated(capsys, "--model", str(workdir / "run")) == want
  # An earlier checkpoint: another model (its merged weights are not exported; the step is what differs).
  assert generated(capsys, "--model", str(workdir / "run"), "--step", "3") != want
