"""Gain against forgetting: the frontier and the selection from a metrics file built by hand, keep-last-N keeping
frontier checkpoints, a budget stop leaving the last in-budget checkpoint, and `--select best-within-budget`
exporting that checkpoint bit for bit."""

import json
import os

import numpy as np
import pytest

from jaxtele import frontier
from jaxtele.errors import JaxteleError
from jaxtele.run import EXPORT, FRONTIER, RunDir


def write_run(folder, rows, steps, budget):
  os.makedirs(folder / "checkpoints", exist_ok=True)
  with open(folder / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  for s in steps:
    os.makedirs(folder / "checkpoints" / str(s) / "meta", exist_ok=True)
    json.dump({"config": {"train": {"forgetting_budget": budget}}}, open(folder / "checkpoints" / str(s) / "meta" /
                                                                          "metadata", "w"))


def row(step, d, g):
  return {"step": step, "forget/domain_bpb": d, "forget/general_bpb": g, "forget/base_domain_bpb": 2.0,
          "forget/base_general_bpb": 1.0}


def test_frontier_and_selection_from_a_hand_built_metrics_file(tmp_path):
  # Base (2.0, 1.0). By hand: step 8 is dominated by step 2 (1.8 <= 1.85, 1.010 <= 1.012); step 4 is the lowest
  # domain bpb but +3% general (over a 2% budget); so the frontier is {2, 4, 6} and the best within budget is 6.
  rows = [row(0, 2.0, 1.0), {"step": 1, "train/loss": 3.0}, row(2, 1.8, 1.010), row(4, 1.6, 1.030),
          row(6, 1.75, 1.015), row(8, 1.85, 1.012)]
  write_run(tmp_path / "run", rows, [2, 4, 6, 8], budget=0.02)
  s = frontier.summary(str(tmp_path / "run"))
  assert s["frontier"] == [2, 4, 6] and s["best_within_budget"] == 6 and s["budget"] == 0.02
  assert [p["over_budget"] for p in s["points"]] == [False, True, False, False]
  assert s["points"][0]["domain_gain"] == pytest.approx(0.2) and s["points"][1]["general_increase"] == \
      pytest.approx(0.03)
  assert frontier.select_step(str(tmp_path / "run"), "best-within-budget", None) == 6
  from jaxtele.run_report import build_report

  page = open(build_report([str(tmp_path / "run")], str(tmp_path / "report"))).read()
  assert "| run | +2.0% | (2.0000, 1.0000) | 2, 4, 6 | step 6 (1.7500, 1.0150) |" in page
  assert (tmp_path / "report" / "frontier.png").exists()
  os.rename(RunDir(tmp_path / "run").step_dir(6), tmp_path / "gone")  # deleted: the next best on disk is 2
  assert frontier.select_step(str(tmp_path / "run"), "best-within-budget", None) == 2
  with pytest.raises(JaxteleError, match="either --select or --step"):
    frontier.select_step(str(tmp_path / "run"), "best-within-budget", 4)
  write_run(tmp_path / "tight", rows, [2, 4, 6, 8], budget=0.001)
  with pytest.raises(JaxteleError, match=r"no checkpoint .* within its forgetting budget \(\+0.1%\)"):
    frontier.select_step(str(tmp_path / "tight"), "best-within-budget", None)
  (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
  with pytest.raises(JaxteleError, match=r"metrics.jsonl:2: malformed JSON"):
    frontier.summary(str(tmp_path / "run"))


def test_keep_last_n_keeps_frontier_checkpoints(tmp_path):
  import grain

  from jaxtele.checkpoint import Checkpointer

  it = iter(grain.MapDataset.range(8).to_iter_dataset())
  with Checkpointer(str(tmp_path), keep=1, async_save=False) as ckpt:
    for step in range(1, 6):
      if step == 3:
        ckpt.protected.add(2)  # step 2 joined the frontier
      w = np.full(3, step, np.float32)
      ckpt.save(step, {"step": step, "params": {"w": w}, "opt_state": {"mu": w}}, it, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5]
  assert RunDir(tmp_path).steps() == [2, 5]


SCRIPT = [(3.0, 2.0), (2.5, 2.01), (2.2, 2.2), (2.1, 2.3)]  # (domain, general) bpb: base, steps 2, 4, 6


def test_budget_stop_keeps_the_last_in_budget_checkpoint_and_export_selects_it_bit_for_bit(tiny, workdir,
                                                                                            monkeypatch):
  """Scripted bpb (the numbers are inputs here; the decisions are under test): step 2 is +0.5% general, step 4
  +10% over a 2% budget, so the run stops at 4 without saving it and step 2 is the one to ship."""
  from safetensors.numpy import load_file

  from jaxtele.checkpoint import saved_params
  from jaxtele.export import export
  from jaxtele.forgetting import Forgetting
  from jaxtele.train import run

  script = iter(SCRIPT)
  monkeypatch.setattr(Forgetting, "pooled", lambda self, out, nbytes: dict(zip(frontier.ROLES, next(script))))
  sets = [{"name": "telecom", "sources": [{"type": "jsonl", "path": "runs/corpus/eval.jsonl"}]},
          {"name": "general", "sources": [{"type": "jsonl", "path": "runs/corpus/eval.jsonl"}]}]
  cfg = tiny(f"--config.eval.sets={sets!r}", "--config.eval.max_batches=1", "--config.eval.forgetting_base=True",
             "--config.train.forgetting_budget=0.02", "--config.train.on_budget=stop", "--config.checkpoint.every=2",
             "--config.checkpoint.keep=1", "--config.export.hf=True")
  result = run(cfg)
  run_dir = workdir / "run"
  assert result["budget_stop"] and result["step"] == 4
  assert frontier.checkpoint_steps(str(run_dir)) == [2] and not os.path.exists(RunDir(run_dir).file(EXPORT))
  rows = {r["step"]: r for r in map(json.loads, open(RunDir(run_dir).metrics)) if "forget/general_bpb" in r}
  assert rows[4]["forget/over_budget"] == 1.0 and rows[2]["forget/over_budget"] == 0.0
  assert json.load(open(RunDir(run_dir).file(FRONTIER)))["best_within_budget"] == 2
  export(str(run_dir), str(workdir / "best"), select="best-within-budget", verify=False)
  saved = saved_params(str(run_dir), 2)
  tensors = load_file(str(workdir / "best" / "model.safetensors"))
  q = np.asarray(saved["layers"]["0"]["self_attn"]["q_proj"]["kernel"]) if "0" in saved["layers"] else \
      np.asarray(saved["layers"][0]["self_attn"]["q_proj"]["kernel"])
  assert np.array_equal(tensors["model.layers.0.self_attn.q_proj.weight"], q.T)
  assert np.array_equal(tensors["model.embed_tokens.weight"], np.asarray(saved["embed_tokens"]["embedding"]))
