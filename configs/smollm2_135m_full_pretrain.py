"""Continual pretraining of SmolLM2-135M on the 3GPP corpus, full fine-tuning.

Seq 2048, ~245k tokens per step (120 x 2048), AdamW lr 1e-4 cosine with 3% warmup to 10%, weight decay
0.01, clip 1.0, bf16 compute over fp32 master weights (`dtype=auto`: fp32 on CPU). 120 rows divide over 1, 2,
3, 4, 5, 6 or 8 GPUs. Evaluates 3GPP held-out clauses
(knowledge gained) and WikiText-2 (general ability kept) before, during and after training.

Prepare the corpus first (and point the paths at your copies of the data):
  python -m jaxtele.data prepare --input data/3gpp --tokenizer HuggingFaceTB/SmolLM2-135M --out data/telecom
  python -m jaxtele.train --config configs/smollm2_135m_full_pretrain.py
A general-text replay source can be mixed in, e.g. 95/5:
  --config.data.sources="[{'type': 'tfds', 'path': 'data/telecom/telecom_corpus/1.0.0', 'weight': 0.95},
                          {'type': 'text', 'path': 'data/general', 'weight': 0.05}]" --config.data.format=...
(one format per run: replay text must be prepared with the same tokenizer, or both given as text).
"""

from jaxtele.config import default_config

TELECOM = "data/telecom/telecom_corpus/1.0.0"


def get_config():
  cfg = default_config()
  cfg.run_dir = "runs/smollm2_135m_full_pretrain"
  cfg.model.source = "HuggingFaceTB/SmolLM2-135M"  # or a local HF folder, or the SmolLM2 .gguf
  # No remat: by a hand count (~780 KB of bf16 activations per token, README "3x L40S") the step fits an H200 at
  # <= 60 rows per GPU, i.e. from 2 GPUs; on one H200 add --config.train.grad_accum=2. Check with --dry_run.
  cfg.model.update(param_dtype="float32", dtype="auto", remat="none")
  cfg.data.sources = [{"type": "tfds", "path": TELECOM, "split": "train"}]
  cfg.data.update(format="tokens", seq_len=2048, batch_size=120, packing="first_fit", num_packing_bins=64, workers=2)
  cfg.eval.sets = [
      {"name": "3gpp_heldout", "sources": [{"type": "tfds", "path": TELECOM, "split": "eval"}], "format": "tokens"},
      {"name": "wikitext2", "sources": [{"type": "text", "path": "data/wikitext2/wiki.test.raw"}], "format": "text"},
  ]
  cfg.eval.update(at_start=True, every=50, max_batches=8, batch_size=24)  # 24: divides over 1-4, 6 or 8 GPUs
  cfg.train.update(mode="full", steps=132, log_every=1)  # ~3 epochs of the 10.8M-token corpus
  cfg.optimizer.update(lr=1e-4, schedule="cosine", warmup_ratio=0.03, final_lr_ratio=0.1, weight_decay=0.01,
                       clip=1.0)
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)
  cfg.checkpoint.update(every=25, keep=3)
  cfg.export.hf = True
  return cfg
