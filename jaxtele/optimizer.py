"""AdamW with warmup + cosine/linear/constant decay, global-norm clipping, and no decay on norms/biases.

The optimizer only ever sees the trainable leaves (the state is split by `models.lora.trainable_filter`
before it gets here), so frozen weights hold no moments at all and can't move: stronger than an
optax partition with `set_to_zero`, and no zero gradients are materialised for them.

LoRA+ (Hayou et al. 2024): `lora_b` leaves get `plus_ratio` times the learning rate of everything else, via
an optax multi_transform over labels read from the leaf names (0 or 1 = off: the plain chain, same state).
"""

import jax
import optax

from jaxtele.errors import JaxteleError


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


def lora_plus_labels(params):
  """'b' for LoRA B leaves, 'rest' for every other leaf."""
  def label(path, _):
    leaf = path[-1]
    return "b" if getattr(leaf, "key", getattr(leaf, "name", None)) == "lora_b" else "rest"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg, total_steps: int, plus_ratio: float = 0.0):
  """AdamW over the trainable leaves; `plus_ratio` > 1 (config `lora.plus_ratio`) turns on LoRA+."""
  if plus_ratio < 0:
    raise JaxteleError(f"lora.plus_ratio: must be >= 0 (0 or 1 = off), got {plus_ratio}")
  lr = schedule(cfg, total_steps)
  adamw = lambda rate: optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   mask=decay_mask)
  if plus_ratio and plus_ratio != 1:
    ratio = float(plus_ratio)
    update = optax.multi_transform({"rest": adamw(lr), "b": adamw(lambda step: ratio * lr(step))}, lora_plus_labels)
  else:
    update = adamw(lr)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip) if cfg.clip > 0 else optax.identity(), update)
  return tx, lr


def run_optimizer(cfg):
  """(tx, lr schedule) of a run config: LoRA+ when a LoRA run sets `lora.plus_ratio`."""
  plus = cfg.lora.get("plus_ratio", 0.0) if cfg.train.mode == "lora" else 0.0
  return make_optimizer(cfg.optimizer, cfg.train.steps, plus_ratio=plus)
