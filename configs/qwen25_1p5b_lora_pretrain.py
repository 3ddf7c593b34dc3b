"""Continual pretraining of Qwen2.5-1.5B on the 3GPP corpus with LoRA r=64, alpha=128 on every
projection (q/k/v/o/gate/up/down), the base frozen in bf16. The measured counterpart of full FT:
compare its 3GPP and WikiText-2 perplexities with smollm2_135m_full_pretrain's.

  python -m jaxtele.data prepare --input data/3gpp --tokenizer Qwen/Qwen2.5-1.5B --out data/telecom_qwen
  python -m jaxtele.train --config configs/qwen25_1p5b_lora_pretrain.py
"""

from jaxtele.config import default_config

TELECOM = "data/telecom_qwen/telecom_corpus/1.0.0"


def get_config():
  cfg = default_config()
  cfg.run_dir = "runs/qwen25_1p5b_lora_pretrain"
  cfg.model.source = "Qwen/Qwen2.5-1.5B"
  cfg.model.update(param_dtype="bfloat16", dtype="bfloat16", remat="full")
  cfg.data.sources = [{"type": "tfds", "path": TELECOM, "split": "train"}]
  cfg.data.update(format="tokens", seq_len=2048, batch_size=64, packing="first_fit", num_packing_bins=64, workers=2)
  cfg.eval.sets = [
      {"name": "3gpp_heldout", "sources": [{"type": "tfds", "path": TELECOM, "split": "eval"}], "format": "tokens"},
      {"name": "wikitext2", "sources": [{"type": "text", "path": "data/wikitext2/wiki.test.raw"}], "format": "text"},
  ]
  cfg.eval.update(at_start=True, every=50, max_batches=8, batch_size=8)
  cfg.train.update(mode="lora", steps=250, log_every=1)
  cfg.lora.update(rank=64, alpha=128.0, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                  base_dtype="bfloat16")
  cfg.optimizer.update(lr=2e-4, schedule="cosine", warmup_ratio=0.03, final_lr_ratio=0.1, weight_decay=0.0, clip=1.0)
  cfg.mesh.update(data=1, fsdp=-1, tensor=1)
  cfg.checkpoint.update(every=50, keep=3)
  cfg.export.update(adapter=True, merged=True)
  return cfg
