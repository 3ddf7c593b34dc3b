"""Sweeps: a grid of ordinary runs as a resumable queue, its summary checked against the runs' own files, and an
interrupted sweep (a point stopped mid-run) ending with the same summary as an uninterrupted one."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import TINY_RECIPE
from jaxtele.run import RunDir

RECIPE = '''
COMMON = {{"train.steps": 4, "checkpoint.every": 2, "eval.every": 2, "train.log_every": 1}}

def get_sweep(root):
  return {{
      "root": root,
      "recipe": "{recipe}",
      "arms": {{"full": {{**COMMON, "train.mode": "full"}},
                "lora": {{**COMMON, "train.mode": "lora", "lora.rank": 2, "lora.alpha": 4.0}}}},
      "grid": {{"optimizer.lr": [1e-3, 1e-2]}},
      "seeds": [0],
      "best_seeds": [1],
      "select": {{"metric": "eval/telecom/loss", "mode": "min"}},
  }}
'''


@pytest.fixture
def sweep_recipe(workdir):
  path = workdir / "sweep_recipe.py"
  path.write_text(RECIPE.format(recipe=TINY_RECIPE))
  return str(path)


def final_loss(run_dir):
  rows = [json.loads(x) for x in open(RunDir(run_dir).metrics)]
  return [r for r in rows if "eval/telecom/loss" in r][-1]["eval/telecom/loss"]


def comparable(summary):
  """The summary without timings: what an interrupted and an uninterrupted sweep must agree on."""
  return {"arms": {a: {"best": v["best"]["combo"], "edge": v["edge"],
                       "grid": [(g["combo"], sorted(g["by_seed"].items())) for g in v["grid"]]}
                   for a, v in summary["arms"].items()},
          "comparisons": [(c["a"], c["b"], c["mean"], c["ci95"]) for c in summary["comparisons"]],
          "runs": [(r["arm"], r["name"], r["status"], r["final"], r["curve"]) for r in summary["runs"]]}


def test_sweep_runs_resumes_and_summarises(workdir, sweep_recipe):
  from scipy import stats

  from jaxtele.config import load_config
  from jaxtele.sweep import main
  from jaxtele.train import run

  root_a = str(workdir / "a")
  assert main(["--config", f"{sweep_recipe}:{root_a}"]) == 0
  summary = json.load(open(os.path.join(root_a, "summary.json")))
  assert summary["points"] == summary["finished"] == 6  # 2 arms x 2 lr x seed 0, then seed 1 at each arm's best
  for arm in ("full", "lora"):
    # The choice, recomputed from the runs' metrics.jsonl: the lr with the lower final held-out loss at seed 0.
    losses = {lr: final_loss(os.path.join(root_a, arm, f"lr={lr:g},seed=0")) for lr in (1e-3, 1e-2)}
    best = min(losses, key=losses.get)
    chosen = summary["arms"][arm]["best"]
    assert chosen["combo"] == {"optimizer.lr": best}
    assert summary["arms"][arm]["edge"] == ["optimizer.lr"]  # a 2-value grid: any choice is on its edge
    seeds = [final_loss(os.path.join(root_a, arm, f"lr={best:g},seed={s}")) for s in (0, 1)]
    assert chosen["n"] == 2 and chosen["mean"] == pytest.approx(np.mean(seeds), rel=1e-9)
    assert chosen["sd"] == pytest.approx(np.std(seeds, ddof=1), rel=1e-9)
  (c,) = summary["comparisons"]
  d = np.subtract([v for _, v in sorted(summary["arms"]["full"]["best"]["by_seed"].items())],
                  [v for _, v in sorted(summary["arms"]["lora"]["best"]["by_seed"].items())])
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))  # the outside reference: scipy's t
  assert c["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-3)
  assert (c["verdict"] == "not distinguishable at 95%") == (c["ci95"][0] <= 0 <= c["ci95"][1])
  assert "| full |" in open(os.path.join(root_a, "summary.md")).read()

  # Interrupted: two points, then the third stopped after its first checkpoint (as a kill after a save leaves it).
  root_b = str(workdir / "b")
  assert main(["--config", f"{sweep_recipe}:{root_b}", "--max-points", "2"]) == 0
  third = json.load(open(os.path.join(root_b, "summary.json")))["runs"][2]
  assert third["status"] is None
  overrides = {**{"train.steps": 4, "checkpoint.every": 2, "eval.every": 2, "train.log_every": 1},
               "train.mode": "lora", "lora.rank": 2, "lora.alpha": 4.0, "optimizer.lr": 1e-3, "seed": 0,
               "data.seed": 0, "train.stop_at": 2, "run_dir": os.path.join(root_b, "lora", "lr=0.001,seed=0")}
  run(load_config(TINY_RECIPE, [f"--config.{k}={v}" for k, v in overrides.items()]))
  assert main(["--config", f"{sweep_recipe}:{root_b}"]) == 0
  resumed = json.load(open(os.path.join(root_b, "summary.json")))
  assert comparable(resumed) == comparable(summary)
  # Nothing is run twice: a finished sweep leaves every point as it was.
  before = open(RunDir(os.path.join(root_b, "full", "lr=0.001,seed=0")).metrics).read()
  assert main(["--config", f"{sweep_recipe}:{root_b}"]) == 0
  assert open(RunDir(os.path.join(root_b, "full", "lr=0.001,seed=0")).metrics).read() == before
  shutil.rmtree(root_b)


def test_sweep_bad_recipe_and_point(workdir, sweep_recipe, capsys):
  from jaxtele.sweep import main

  bad = workdir / "bad.py"
  bad.write_text("def get_sweep():\n  return {'root': 'x', 'recipe': 'y', 'arms': {'a': {}}, 'select': {}, 'typo': 1}\n")
  with pytest.raises(SystemExit, match="2"):
    main(["--config", str(bad)])
  assert "unknown key 'typo'" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="2"):
    main(["--config", f"{sweep_recipe}:{workdir / 'c'}", "--point", "9"])
  err = capsys.readouterr().err
  assert "--point: 9 is outside 0..3" in err and "best_seeds" in err
  assert main(["--config", f"{sweep_recipe}:{workdir / 'c'}", "--slurm"]) == 0
  out = capsys.readouterr().out
  assert "--array=0-3" in out and "--array=4-5" in out and "afterok" in out


def test_t_quantiles_match_scipy():
  from scipy import stats

  from jaxtele.sweep_summary import t975

  for df in range(1, 31):
    assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_sweep_arm_grids(workdir):
  """`grids` gives an arm its own grid: its points, and the edge flag read against that grid, not the shared one."""
  from jaxtele.errors import JaxteleError
  from jaxtele.sweep import first_stage, load_sweep
  from jaxtele.sweep_summary import edges

  path = workdir / "grids.py"
  body = ("def get_sweep(arg=''):\n  return {'root': 'r', 'recipe': 'x.py', 'arms': {'full': {}, 'lora': {}},\n"
          "          'grid': {'optimizer.lr': [1e-3, 3e-3]}, 'select': {'metric': 'm'},\n"
          "          'grids': {'lora' if not arg else arg: {'optimizer.lr': [1e-2, 3e-2, 1e-1]}}}\n")
  path.write_text(body)
  sweep = load_sweep(str(path))
  names = [(p["arm"], p["name"]) for p in first_stage(sweep)]
  assert names == [("full", "lr=0.001,seed=0"), ("full", "lr=0.003,seed=0"), ("lora", "lr=0.01,seed=0"),
                   ("lora", "lr=0.03,seed=0"), ("lora", "lr=0.1,seed=0")]
  assert edges(sweep, {"optimizer.lr": 3e-2}, "lora") == []  # the middle of lora's grid
  assert edges(sweep, {"optimizer.lr": 3e-3}, "full") == ["optimizer.lr"]
  with pytest.raises(JaxteleError, match="grids names 'lorra', not an arm"):
    load_sweep(f"{path}:lorra")
