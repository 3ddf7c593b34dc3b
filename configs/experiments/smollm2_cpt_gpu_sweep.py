"""The GPU sweep (docs/experiments/smollm2_cpt_gpu.md): SmolLM2-135M, full FT at 2 learning rates, LoRA r=8 and r=64
at 2 each, one seed, chosen by the final by-spec held-out loss.

  python -m jaxtele.sweep --config configs/experiments/smollm2_cpt_gpu_sweep.py
"""

RECIPE = "configs/experiments/smollm2_cpt_gpu.py"
ARMS = ("full", "lora_r8", "lora_r64")


def get_sweep(root: str = ""):
  return {
      "root": root or "runs/smollm2_cpt_gpu/sweep",
      "recipe": RECIPE + ":{arm}",
      "arms": {arm: {} for arm in ARMS},
      "grid": {"optimizer.lr": [5e-5, 2e-4]},  # full FT (the reference used 1e-4, between the two)
      "grids": {arm: {"optimizer.lr": [5e-4, 2e-3]} for arm in ARMS if arm != "full"},
      "seeds": [0],
      "select": {"metric": "eval/3gpp_heldout_spec/loss", "mode": "min"},
      "compare": [["full", "lora_r8"], ["full", "lora_r64"], ["lora_r64", "lora_r8"]],
  }
