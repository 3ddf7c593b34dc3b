"""The analog's sweep (docs/experiments/lora_saturation_analog.md): 5 arms x 3 learning rates at seed 0, then seeds
1 and 2 at each arm's best rate, chosen by the final by-spec held-out loss of the target domain.

  python -m jaxtele.sweep --config configs/experiments/lora_saturation_analog_sweep.py
`:ROOT` after the path puts the sweep under ROOT; `:smoke:ROOT` also shortens every run and starts it from the base
exported under ROOT/base (tests, smoke runs: train that base with --config.run_dir=ROOT/base).
"""

RECIPE = "configs/experiments/lora_saturation_analog.py"
ARMS = ("full", "lora_r1", "lora_r4", "lora_r24", "lora_r1_emb")
# Constant after warm-up. Adapters (B = 0 at the start, alpha = 2r) take larger rates than full weights.
FULL_LRS = [1e-3, 3e-3, 1e-2]
LORA_LRS = [3e-3, 1e-2, 3e-2]
SMOKE = {"train.steps": 8, "eval.at_tokens_log": (4096, 32768, 4), "checkpoint.every": 4}


def get_sweep(arg: str = ""):
  smoke = arg.startswith("smoke:")
  root = arg.removeprefix("smoke:") or "runs/analog/sweep"
  extra = {**SMOKE, "model.source": f"{root}/base/export/hf"} if smoke else {}
  return {
      "root": root,
      "recipe": RECIPE + ":{arm}",
      "arms": {arm: dict(extra) for arm in ARMS},
      "grid": {"optimizer.lr": FULL_LRS},
      "grids": {arm: {"optimizer.lr": LORA_LRS} for arm in ARMS if arm != "full"},
      "seeds": [0],
      "best_seeds": [1, 2],
      "select": {"metric": "eval/target_spec/loss", "mode": "min"},
      "compare": [["full", arm] for arm in ARMS if arm != "full"],
  }
