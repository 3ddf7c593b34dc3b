"""The GPU sweep's end-of-run evaluation (docs/experiments/smollm2_cpt_gpu.md): the whole TeleQnA standards set
(3,000 items) as multiple choice in both styles, and, for a run directory, the run's own eval sets again with one
row per document, so `python -m jaxtele.eval.compare` can pair two models item by item (McNemar) and document by
document (paired bootstrap). No generation, no contamination index: minutes of GPU time are the budget.

  python -m jaxtele.eval --config configs/eval/telecom_mcq.py --model RUN_DIR --out runs/eval/NAME
"""

from jaxtele.eval.config import default_config
from jaxtele.eval.items import STANDARDS


def get_config():
  cfg = default_config()
  cfg.data_root = "../shared/data"
  cfg.out = "runs/eval/telecom_mcq"
  cfg.model.update(param_dtype="float32", dtype="bfloat16")
  cfg.perplexity.update(run_sets=True, seq_len=2048, batch_size=24, max_batches=0)
  standards = {"path": "{data_root}/teleqna/TeleQnA.json", "format": "teleqna", "categories": list(STANDARDS),
               "limit": 0, "seed": 0}
  cfg.mcq.sets = [{"name": "teleqna_standards", **standards, "style": "cloze"},
                  {"name": "teleqna_standards_letter", **standards, "style": "letter"}]
  cfg.mcq.batch_size = 32
  return cfg
