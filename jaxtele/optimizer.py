"""AdamW with warmup + cosine/linear/constant decay, global-norm clipping, and no decay on norms/biases.

The optimizer only ever sees the trainable leaves (the state is split by `models.lora.trainable_filter`
before it gets here), so frozen weights hold no moments at all and can't move: stronger than an
optax partition with `set_to_zero`, and no zero gradients are materialised for them.
"""

import jax
import optax


def schedule(cfg, total_steps: int):
  warmup = int(cfg.warmup_ratio * total_steps)
  peak, final = cfg.lr, cfg.lr * cfg.final_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_ratio)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, final, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings, LoRA factors), not on norms and biases."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg, total_steps: int):
  lr = schedule(cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.clip) if cfg.clip > 0 else optax.identity(),
      optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask),
  )
  return tx, lr
