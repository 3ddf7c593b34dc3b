"""The scaled analog of "LoRA saturates in domain pretraining" (docs/experiments/lora_saturation_analog.md): a tiny
byte-level Llama-shaped base pretrained from scratch on a SOURCE domain, then continual pretraining on a TARGET
domain at ~28 tokens per parameter, each document seen at most once.

  python -m jaxtele.data.analog --data ../shared/data --out runs/analog/data
  python -m jaxtele.train --config configs/experiments/lora_saturation_analog.py:base
  python -m jaxtele.sweep --config configs/experiments/lora_saturation_analog_sweep.py
The arm after the colon: `base` (pretraining on the source, exported as an HF folder the other arms start from),
or a continual-pretraining arm of ARMS. The sweep sets the learning rate and the seed of each point.
"""

from jaxtele.config import default_config

DATA = "runs/analog/data"  # python -m jaxtele.data.analog --out runs/analog/data
ROOT = "runs/analog"
BASE_EXPORT = ROOT + "/base/export/hf"

# 19,128 parameters: embeddings 264 x 24 (tied, 33% of the model; SmolLM2-135M's are 21%), 2 layers of 6,384.
D, LAYERS, FFN, HEADS, KV_HEADS, VOCAB = 24, 2, 64, 4, 2, 264
PARAMS = VOCAB * D + LAYERS * (2 * D * D + 2 * D * (D // HEADS) * KV_HEADS + 3 * D * FFN + 2 * D) + D
SEQ, BATCH = 128, 32
TOKENS_PER_STEP = SEQ * BATCH
BASE_STEPS = 500  # source pretraining: 2.05M tokens (107 per parameter, 0.21 epoch), cosine to its end
CPT_STEPS = 132  # continual pretraining: 540,672 tokens = 28.3 per parameter, ~17% of target_train

# arm: what it trains (lr is the sweep's). r/d = 1/24 = 4.2%, the reference study's 64/1536;
# alpha = 2r throughout (the reference's 128/64).
ARMS = {
    "full": {"train.mode": "full"},
    "lora_r1": {"train.mode": "lora", "lora.rank": 1, "lora.alpha": 2.0},
    "lora_r4": {"train.mode": "lora", "lora.rank": 4, "lora.alpha": 8.0},
    "lora_r24": {"train.mode": "lora", "lora.rank": D, "lora.alpha": 2.0 * D},
    "lora_r1_emb": {"train.mode": "lora", "lora.rank": 1, "lora.alpha": 2.0, "lora.train_embeddings": True,
                    "lora.train_head": True, "lora.extra_trainable": r".*norm.*"},
}


def eval_sets():
  f = lambda name, role: {"name": name, "role": role, "format": "text",  # noqa: E731
                          "sources": [{"type": "jsonl", "path": f"{DATA}/{name}.jsonl"}]}
  return [f("target_spec", "domain"), f("target_clause", "domain"), f("source_heldout", "general"),
          f("general_heldout", "general")]


def get_config(arm: str = "full"):
  if arm != "base" and arm not in ARMS:
    raise ValueError(f"arm {arm!r}: choose base or one of {', '.join(ARMS)}")
  cfg = default_config()
  cfg.run_dir = f"{ROOT}/{arm}"
  cfg.model.tokenizer = "bytes"
  cfg.data.update(format="text", seq_len=SEQ, batch_size=BATCH, packing="first_fit", num_packing_bins=8, seed=0)
  cfg.eval.sets = eval_sets()
  cfg.eval.update(max_batches=0, batch_size=32)  # every eval file is scored in full
  cfg.checkpoint.update(keep=1, async_save=False)
  cfg.model.init.update(model_type="llama", vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN,
                        num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=D // HEADS,
                        max_position_embeddings=SEQ, rope_theta=10000.0, tie_word_embeddings=True)
  if arm == "base":
    cfg.data.sources = [{"type": "jsonl", "path": f"{DATA}/source_train.jsonl"}]
    cfg.eval.update(at_start=False, every=BASE_STEPS // 2)
    cfg.train.update(mode="full", steps=BASE_STEPS, log_every=50)
    cfg.optimizer.update(lr=3e-3, schedule="cosine", warmup_ratio=0.05, final_lr_ratio=0.1, weight_decay=0.0,
                         clip=1.0)
    cfg.checkpoint.update(every=BASE_STEPS // 4)
    cfg.export.update(hf=True, verify=False)
    return cfg
  cfg.model.source = BASE_EXPORT  # the base's HF export (model.init above is its architecture, for dry runs)
  cfg.data.sources = [{"type": "jsonl", "path": f"{DATA}/target_train.jsonl"}]
  cfg.data.num_epochs = 1  # no document twice: the run must end before the epoch does
  # Log-spaced in tokens: 1/64 .. 1 of the run, 7 points = 6 doublings, plus the base at step 0.
  cfg.eval.update(at_start=True, every=0, at_tokens_log=(CPT_STEPS * TOKENS_PER_STEP // 64,
                                                         CPT_STEPS * TOKENS_PER_STEP, 7))
  cfg.train.update(steps=CPT_STEPS, log_every=25)
  cfg.optimizer.update(lr=1e-3, schedule="constant_with_warmup", warmup_ratio=0.02, weight_decay=0.0, clip=1.0)
  cfg.checkpoint.update(every=CPT_STEPS // 4, keep=4)  # D/4, D/2, 3D/4, D: rho and intruders over D
  cfg.lora.update(targets="all-linear")
  for key, value in ARMS[arm].items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg
