"""A tiny model on a generated corpus: the recipe the test-suite trains (seconds on CPU)."""

from jaxtele.config import default_config

CORPUS = "runs/corpus"  # python -m jaxtele.data synthetic --out runs/corpus


def get_config():
  cfg = default_config()
  cfg.run_dir = "runs/tiny_test"
  cfg.model.tokenizer = "bytes"
  cfg.model.init.update(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, max_position_embeddings=256)
  cfg.data.sources = [{"type": "jsonl", "path": CORPUS + "/train.jsonl"}]
  cfg.data.update(seq_len=64, batch_size=8, packing="first_fit", num_packing_bins=4)
  cfg.eval.sets = [{"name": "telecom", "sources": [{"type": "jsonl", "path": CORPUS + "/eval.jsonl"}]}]
  cfg.eval.update(every=0, max_batches=2, batch_size=8)
  cfg.train.update(steps=6, log_every=2)
  cfg.optimizer.update(lr=3e-3, warmup_ratio=0.0)
  cfg.checkpoint.update(every=3, keep=3, async_save=False)
  return cfg
