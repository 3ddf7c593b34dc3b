"""Weights & Biases beside metrics.jsonl: an offline run (no network) whose own transaction log, read back by
wandb's reader (`wandb leet inspect --json`), holds the same keys and values at the same steps."""

import glob
import json
import os
import subprocess
import sys

import pytest

from jaxtele.config import load_config
from jaxtele.metrics import MetricsWriter, read_metrics


def test_offline_wandb_run_holds_the_logged_metrics(tmp_path):
  pytest.importorskip("wandb")
  logged = {0: {"eval/telecom/ppl": 40.5, "eval/telecom/loss": 3.7}, 2: {"train/loss": 3.25, "train/lr": 1e-3},
            4: {"train/loss": 2.5, "train/lr": 5e-4, "train/mfu": None}}
  w = MetricsWriter(str(tmp_path), wandb={"project": "jaxtele-test", "name": "tiny", "mode": "offline"},
                    config={"train": {"steps": 4}})
  for step, metrics in logged.items():
    w.write(step, metrics)
  w.close()
  rows = read_metrics(str(tmp_path))
  (log,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
  cli = os.path.join(os.path.dirname(sys.executable), "wandb")
  out = subprocess.run([cli, "leet", "inspect", "--json", log], capture_output=True, text=True, timeout=120)
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  history = {}
  for r in records:
    if r.get("type") == "history":
      item = r["history"]["item"]
      history.setdefault(item["_step"], {}).update({k: v for k, v in item.items() if not k.startswith("_")})
  assert history == {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in rows}
  assert history[4] == {"train/loss": 2.5, "train/lr": 5e-4}  # None (no MFU on CPU) is logged nowhere
  config = [r for r in records if r.get("type") == "run"]
  assert config and "jaxtele-test" in json.dumps(config[0])


def test_wandb_config_keys_are_checked():
  from jaxtele.errors import JaxteleError

  recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_test.py")
  cfg = load_config(recipe, ["--config.metrics.wandb.project=p", "--config.metrics.wandb.mode=offline"])
  assert cfg.metrics.wandb.project == "p"
  with pytest.raises(JaxteleError, match="metrics.wandb.mode: 'sometimes' is not one of offline, online"):
    load_config(recipe, ["--config.metrics.wandb.mode=sometimes"])
