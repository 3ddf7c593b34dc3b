"""The analog experiment's corpora (source / target, held out by clause and by whole spec) on a small fake copy of
the shared data, and its recipes: every arm and every sweep point loads, and the recipes dry-run."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "experiments", "lora_saturation_analog.py")
SWEEP = os.path.join(ROOT, "configs", "experiments", "lora_saturation_analog_sweep.py")


def spec_text(number, clauses=40):
  body = [f"# {number} title page", "copyright"]
  for i in range(1, clauses + 1):
    body += [f"## {i}Clause {i} of {number}", f"Text of clause {i} in TS {number}: value {i * 7} dB. " * 3]
  return "\n".join(body) + "\n"


@pytest.fixture
def fake_data(tmp_path):
  d = tmp_path / "data"
  (d / "3gpp").mkdir(parents=True)
  for number in ("23.501", "23.502", "24.301", "38.211", "38.101-5", "38.212", "38.300"):
    (d / "3gpp" / f"{number}_Spec.md").write_text(spec_text(number))
  (d / "wikitext2").mkdir()
  arts = [f" = Article {i} = \n" + f" Paragraph one of article {i} , long enough to count as a paragraph ." * 2 + "\n"
          for i in range(30)]
  (d / "wikitext2" / "wiki.test.raw").write_text("".join(arts))
  (d / "alpaca").mkdir()
  (d / "alpaca" / "alpaca_5000.json").write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
  return d


def read(out, name):
  return [json.loads(x) for x in open(out / f"{name}.jsonl")]


def test_corpora_split_by_spec_and_by_clause(fake_data, tmp_path):
  from jaxtele.data.analog import build

  out = tmp_path / "out"
  stats = build(str(fake_data), str(out), clause_fraction=0.1, general_fraction=0.3, eval_bytes=0, train_bytes=0,
                log=lambda m: None)
  ids = {name: {r["id"] for r in read(out, name)} for name in stats["files"]}
  spec = lambda i: i.split(" ")[1] if i.startswith("TS ") else i.split(":")[0]  # noqa: E731
  assert {spec(i) for i in ids["target_spec"]} == {"38.211", "38.101-5"}  # whole specs, and only those
  assert {spec(i) for i in ids["target_train"] | ids["target_clause"]} == {"38.212"}
  assert not any("38.300" in i for v in ids.values() for i in v)  # neither source nor target
  assert {spec(i) for i in ids["source_heldout"]} <= {"23.501", "23.502", "24.301"} and ids["source_heldout"]
  for a in ids:  # no document in two files
    for b in ids:
      assert a == b or not ids[a] & ids[b], (a, b)
  held = {i.rsplit(":", 1)[0] for i in ids["general_heldout"]}
  assert held and not held & ids["source_train"]  # a held-out article is nowhere in training
  assert "alpaca:0" in ids["source_train"]
  sampled = build(str(fake_data), str(tmp_path / "s"), clause_fraction=0.1, eval_bytes=400, train_bytes=2000,
                  log=lambda m: None)
  assert 0 < sampled["files"]["target_spec"]["bytes"] <= 400 and sampled["files"]["target_train"]["bytes"] <= 2000


def test_corpora_bad_input(fake_data, tmp_path, capsys):
  from jaxtele.data.analog import main

  with pytest.raises(SystemExit, match="2"):
    main(["--data", str(fake_data), "--out", str(tmp_path / "o"), "--heldout-specs", "38.999"])
  assert "spec 38.999 is not in" in capsys.readouterr().err


def test_every_arm_and_sweep_point_loads():
  from jaxtele.config import load_config
  from jaxtele.sweep import _override, first_stage, load_sweep

  for arm in ("base", "full", "lora_r1", "lora_r4", "lora_r24", "lora_r1_emb"):
    cfg = load_config(f"{RECIPE}:{arm}")
    assert cfg.model.init.hidden_size == 24 and (arm == "base") == (cfg.model.source == "")
  sweep = load_sweep(SWEEP)
  points = first_stage(sweep)
  assert len(points) == 15 and sweep["best_seeds"] == [1, 2]
  for p in points:
    cfg = load_config(sweep["recipe"].replace("{arm}", p["arm"]), [_override(k, v) for k, v in p["settings"].items()])
    assert cfg.optimizer.schedule == "constant_with_warmup" and cfg.data.num_epochs == 1
    tokens = cfg.train.steps * cfg.data.seq_len * cfg.data.batch_size
    assert 27.5 < tokens / 19128 < 28.5  # the reference's ~28 tokens per parameter


@pytest.mark.parametrize("arm", ["base", "lora_r1_emb"])
def test_recipes_dry_run(arm, capsys):
  from jaxtele.train import main

  assert main(["--config", f"{RECIPE}:{arm}", "--config.model.source=", "--dry_run"]) == 0
  captured = capsys.readouterr()
  assert ("7,320 trainable" if arm == "lora_r1_emb" else "19,128 trainable") in captured.out + captured.err
