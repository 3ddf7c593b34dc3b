"""AdamW with warmup + cosine/linear/constant/warmup-stable-decay schedules, global-norm clipping, and no
decay on norms/biases.

The optimizer only ever sees the trainable leaves (the state is split by `models.lora.trainable_filter`
before it gets here), so frozen weights hold no moments at all and can't move: stronger than an
optax partition with `set_to_zero`, and no zero gradients are materialised for them.

LoRA+ (Hayou et al. 2024): the leaves an adapter class declares `plus` (LoRA's B) get `plus_ratio` times the
learning rate of everything else, via an optax multi_transform over labels read from those declarations
(models/leaves.py; 0 or 1 = off: the plain chain, same state).
A LoRA run training its embeddings / head can give them their own peak rate (`lora.embedding_lr`, as CPT
recipes do): the same schedule shape scaled by embedding_lr / lr, a third label in the same multi_transform.
"""

import jax
import jax.numpy as jnp
import optax

from jaxtele.errors import JaxteleError
from jaxtele.models import leaves


SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "wsd")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


def decay_curve(shape: str, peak: float, final: float, steps: int):
  """peak -> final over `steps` updates: linear, half a cosine, or 1 - sqrt (Hagele et al. 2024, the WSD
  cooldown they found best); held at `final` after."""
  steps = max(steps, 1)

  def lr(count):
    t = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0)
    frac = {"linear": 1.0 - t, "cosine": 0.5 * (1.0 + jnp.cos(jnp.pi * t)), "sqrt": 1.0 - jnp.sqrt(t)}[shape]
    return final + (peak - final) * frac

  return lr


def wsd_decay_steps(cfg, total_steps: int) -> int:
  return int(round(cfg.get("decay_fraction", 0.2) * total_steps))


def schedule(cfg, total_steps: int):
  """The learning rate of each update, by optax's count (0 = the first update).

  Warmup rises linearly to the peak over `warmup_ratio * total_steps` updates, reaching it at the last of
  them: update c runs at peak * (c + 1) / warmup, so the first update is never a no-op at lr 0. Then:
  cosine / linear decay to `final_lr_ratio * lr` at `total_steps`; constant (= constant_with_warmup) holds the
  peak; wsd (warmup-stable-decay) holds the peak and decays over the last `decay_fraction` of the run, in
  `decay_shape`.
  """
  warmup = int(cfg.warmup_ratio * total_steps)
  peak, final = cfg.lr, cfg.lr * cfg.final_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  kind = cfg.schedule
  if kind not in SCHEDULES:
    raise JaxteleError(f"optimizer.schedule: unknown schedule {kind!r} (choose from {', '.join(SCHEDULES)})")
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_ratio)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, final, decay_steps)
  elif kind == "wsd":
    cool = wsd_decay_steps(cfg, total_steps)
    if warmup + cool > total_steps:
      raise JaxteleError(f"optimizer.decay_fraction: warmup ({warmup}) + decay ({cool}) updates exceed the "
                         f"{total_steps} of the run (warmup_ratio + decay_fraction must be <= 1)")
    shape = cfg.get("decay_shape", "sqrt")
    if shape not in DECAY_SHAPES:
      raise JaxteleError(f"optimizer.decay_shape: unknown shape {shape!r} (choose from {', '.join(DECAY_SHAPES)})")
    stable = total_steps - warmup - cool
    decay = optax.join_schedules([optax.constant_schedule(peak), decay_curve(shape, peak, final, cool)], [stable])
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  # linear_schedule holds `init` when transition_steps is 0: warmup=1 runs its one update at the peak.
  rise = optax.linear_schedule(peak / warmup, peak, warmup - 1)
  return optax.join_schedules([rise, decay], [warmup])


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings, LoRA factors), not on norms and biases."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def _plus(path) -> bool:
  declared = leaves.spec(path)
  return declared is not None and declared.plus


def lora_plus_labels(params):
  """'b' for the leaves declared to take LoRA+'s rate (LoRA's B), 'rest' for every other leaf."""
  return jax.tree_util.tree_map_with_path(lambda path, _: "b" if _plus(path) else "rest", params)


EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def group_labels(params, plus: bool, embed: bool):
  """'embed' for base leaves of the embedding / head (when `embed`), 'b' for LoRA+'s leaves (when `plus`), else
  'rest'."""
  def label(path, _):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if embed and names[0] in EMBEDDING_MODULES and leaves.spec(path) is None:
      return "embed"
    return "b" if plus and _plus(path) else "rest"

  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg, total_steps: int, plus_ratio: float = 0.0, embedding_lr: float = 0.0):
  """AdamW over the trainable leaves; `plus_ratio` > 1 (config `lora.plus_ratio`) turns on LoRA+;
  `embedding_lr` > 0 (config `lora.embedding_lr`) is the peak rate of the embedding / head leaves."""
  if plus_ratio < 0:
    raise JaxteleError(f"lora.plus_ratio: must be >= 0 (0 or 1 = off), got {plus_ratio}")
  if embedding_lr < 0:
    raise JaxteleError(f"lora.embedding_lr: must be >= 0 (0 = optimizer.lr), got {embedding_lr}")
  lr = schedule(cfg, total_steps)
  adamw = lambda rate: optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   mask=decay_mask)
  plus, embed = bool(plus_ratio and plus_ratio != 1), bool(embedding_lr)
  if plus or embed:
    rates = {"rest": adamw(lr)}
    if plus:
      ratio = float(plus_ratio)
      rates["b"] = adamw(lambda step: ratio * lr(step))
    if embed:
      e_ratio = float(embedding_lr) / cfg.lr
      rates["embed"] = adamw(lambda step: e_ratio * lr(step))
    update = optax.multi_transform(rates, lambda params: group_labels(params, plus, embed))
  else:
    update = adamw(lr)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip) if cfg.clip > 0 else optax.identity(), update)
  return tx, lr


def run_optimizer(cfg):
  """(tx, lr schedule) of a run config: LoRA+ when a LoRA run sets `lora.plus_ratio`."""
  lora = cfg.train.mode == "lora"
  plus = cfg.lora.get("plus_ratio", 0.0) if lora else 0.0
  embed = cfg.lora.get("embedding_lr", 0.0) if lora else 0.0
  return make_optimizer(cfg.optimizer, cfg.train.steps, plus_ratio=plus, embedding_lr=embed)
