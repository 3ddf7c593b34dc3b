"""Quickstart: a tiny Llama-family model trained from scratch on a generated telecom corpus.

Offline, CPU, about two minutes: evaluates a baseline, trains, checkpoints, evaluates again and exports
an HF folder that `transformers` loads. Writes everything under runs/quickstart/.
  python -m jaxtele.data synthetic --out runs/corpus
  python -m jaxtele.train --config configs/quickstart.py
"""

from jaxtele.config import default_config

CORPUS = "runs/corpus"  # python -m jaxtele.data synthetic --out runs/corpus


def get_config():
  cfg = default_config()
  cfg.run_dir = "runs/quickstart"
  cfg.model.tokenizer = "bytes"
  cfg.model.init.update(model_type="llama", vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4,
                        num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512,
                        rope_theta=10000.0, tie_word_embeddings=True)
  cfg.data.sources = [{"type": "jsonl", "path": CORPUS + "/train.jsonl"}]
  cfg.data.update(seq_len=256, batch_size=16, packing="first_fit", num_packing_bins=8)
  cfg.eval.sets = [{"name": "telecom_heldout", "sources": [{"type": "jsonl", "path": CORPUS + "/eval.jsonl"}]}]
  cfg.eval.update(at_start=True, every=100, max_batches=4, batch_size=16)
  cfg.train.update(mode="full", steps=200, log_every=25)
  cfg.optimizer.update(lr=3e-3, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01, clip=1.0)
  cfg.checkpoint.update(every=100, keep=2)
  cfg.export.hf = True
  return cfg
