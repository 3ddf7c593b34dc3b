"""Bad configs and inputs stop the trainer with one line naming the key, before anything heavy;
checkpoints of another model are refused; a NaN stops the run and leaves the last checkpoint intact."""


import numpy as np
import pytest

from jaxtele.errors import JaxteleError
from jaxtele.run import RunDir


@pytest.fixture
def train_error(tmp_path, train_cli):
  """train_error(*overrides) -> the last stderr line of a trainer that must exit 2 with one error line."""

  def run(*overrides):
    rc, err = train_cli(tmp_path, *overrides)
    lines = err.strip().splitlines()
    assert rc == 2, err[-2000:]
    assert lines[-1].startswith("error: ")
    return lines[-1]

  return run


def test_unknown_key_on_the_command_line(tmp_path, train_error):
  assert "unknown key 'optimizer.learning_rate'" in train_error("--config.optimizer.learning_rate=1e-3")


def test_unknown_key_in_a_recipe(tmp_path):
  recipe = tmp_path / "typo.py"
  recipe.write_text("from jaxtele.config import default_config\n\ndef get_config():\n  cfg = default_config()\n"
                    "  cfg.optimizer.learning_rate = 1e-3\n  return cfg\n")
  from jaxtele.config import load_config

  with pytest.raises(JaxteleError, match=r"typo\.py: .*learning_rate"):
    load_config(str(recipe))


def test_wrong_type(tmp_path, train_error, tiny):
  assert "config: train.steps: cannot parse 'ten'" in train_error("--config.train.steps=ten")
  with pytest.raises(JaxteleError, match="train.steps: cannot parse '2.5'"):
    tiny("--config.train.steps=2.5")


def test_batch_not_divisible_by_the_mesh(tmp_path, train_error):
  err = train_error("--config.data.batch_size=12")
  assert "data.batch_size: 12 is not divisible" in err and "data x fsdp = 8" in err


def test_seq_longer_than_the_model_allows(tmp_path, train_error):
  err = train_error("--config.data.seq_len=512")
  assert "data.seq_len: 512 exceeds the model's max_position_embeddings (256)" in err


def test_missing_data_path(tmp_path, train_error):
  err = train_error("--config.data.sources=[{'type': 'jsonl', 'path': 'nope.jsonl'}]")
  assert "data.sources[0].path: no such file or folder nope.jsonl" in err


def test_missing_model_path(tmp_path, train_error):
  err = train_error("--config.model.source=models/missing.gguf")
  assert "model.source: no such model file or folder models/missing.gguf" in err


def test_unknown_mode_and_schedule(tmp_path, train_error):
  assert "train.mode: 'qlora' is not one of full, lora" in train_error("--config.train.mode=qlora")


def test_checkpoint_of_another_model_or_rank_is_refused(tmp_path, tiny):
  from jaxtele.train import run

  run(tiny("--config.train.mode=lora", "--config.lora.rank=4", "--config.train.steps=2"))
  with pytest.raises(JaxteleError, match="checkpoint lora differs.*rank: checkpoint 4, run 8"):
    run(tiny("--config.train.mode=lora", "--config.lora.rank=8", "--config.train.steps=4"))
  with pytest.raises(JaxteleError, match="checkpoint model differs.*hidden_size: checkpoint 32, run 48"):
    run(tiny("--config.train.mode=lora", "--config.lora.rank=4", "--config.train.steps=4",
             "--config.model.init.hidden_size=48"))
  with pytest.raises(JaxteleError, match="holds checkpoints up to step 2; set checkpoint.resume=True"):
    run(tiny("--config.train.mode=lora", "--config.lora.rank=4", "--config.checkpoint.resume=False"))


@pytest.mark.parametrize("every", [1, 3])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, train_error, every):
  """lr 1e30 makes step 2 non-finite. every=1: step 1 is saved and stays the last. every=3: the non-finite step
  is only seen once step 3 was dispatched (metrics are read a step late), and neither step 2 nor 3 is saved."""
  err = train_error("--config.optimizer.lr=1e30", "--config.optimizer.clip=0.0", "--config.train.steps=50",
                    f"--config.checkpoint.every={every}", "--config.train.log_every=1")
  assert "non-finite loss" in err and "Last good checkpoint:" in err
  bad = int(err.split("error: step ")[1].split(":")[0])
  ckpts = RunDir(tmp_path / "run").steps()
  assert all(c < bad for c in ckpts), (ckpts, bad)
  if every == 3:
    assert ckpts == [] and "Last good checkpoint: none" in err
    return
  good = int(err.split("Last good checkpoint: step ")[1].split()[0])
  assert ckpts[-1] == good
  from jaxtele.checkpoint import saved_params

  params = saved_params(str(tmp_path / "run"), good)
  assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(params))
