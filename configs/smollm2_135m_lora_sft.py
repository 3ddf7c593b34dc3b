"""Instruction tuning with LoRA r=16, alpha=32 on SmolLM2-135M (by default the continual-pretraining
run's export), Alpaca template, prompt tokens masked from the loss: the second half of the recipe.

  python -m jaxtele.train --config configs/smollm2_135m_lora_sft.py
"""

from jaxtele.config import default_config

ALPACA = "data/alpaca/alpaca_5000.json"


def get_config():
  cfg = default_config()
  cfg.run_dir = "runs/smollm2_135m_lora_sft"
  cfg.model.source = "runs/smollm2_135m_full_pretrain/export/hf"
  cfg.model.update(param_dtype="float32", dtype="bfloat16")
  cfg.data.sources = [{"type": "json", "path": ALPACA, "fields": ["instruction", "input", "output"]}]
  cfg.data.update(format="sft", sft_template="alpaca", seq_len=1024, batch_size=32, packing="first_fit",
                  num_packing_bins=32)
  cfg.train.update(mode="lora", steps=300, log_every=10)
  cfg.lora.update(rank=16, alpha=32.0, targets="all-linear")
  cfg.optimizer.update(lr=2e-4, schedule="cosine", warmup_ratio=0.03, final_lr_ratio=0.1, weight_decay=0.0, clip=1.0)
  cfg.checkpoint.update(every=100, keep=2)
  cfg.export.update(adapter=True, merged=True)
  return cfg
