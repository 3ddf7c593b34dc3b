"""A positive control for "LoRA saturates": a teacher whose difference from the base is known to be rank k.

The teacher is a small base decoder plus a planted rank-k update dW = s U V^T in every layer's MLP down
projection; its samples are the domain corpus. Continual pretraining of the base on that corpus (every document
seen once: no repetition, the large-corpus regime) can close the gap to the teacher only if the trained
parametrisation can express dW: full fine-tuning and LoRA with r >= k can, LoRA with r < k cannot and must
plateau above the teacher's own loss. If the instrument cannot see that, it cannot see saturation anywhere.

  python -m jaxtele.eval.control --out docs/experiments/positive_control [--steps 600]

The measure is the excess loss on held-out teacher samples: NLL(student) - NLL(teacher), nats per token, i.e. the
per-token KL from the teacher to the student (estimated on its samples). Legend: B batch, T length, D model dim,
F MLP dim, V vocab, k planted rank.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxtele.batch import whole_rows
from jaxtele.errors import cli
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import Decoder, init_model
from jaxtele.models.lora import add_lora, trainable_filter
from jaxtele.progress import log
from jaxtele.step import init_state, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Control:
  rank: int = 2  # k, the planted update's rank
  scale: float = 2.0  # each planted direction's singular value
  vocab: int = 48
  length: int = 16  # tokens per sampled document (after a BOS)
  hidden: int = 32
  mlp: int = 64
  layers: int = 1
  seed: int = 0

  def model_config(self) -> ModelConfig:
    return ModelConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.mlp,
                       num_layers=self.layers, num_heads=4, num_kv_heads=2, head_dim=self.hidden // 4,
                       max_position_embeddings=2 * self.length + 2, tie_word_embeddings=True, bos_token_id=1)


def base_model(c: Control) -> Decoder:
  """A random decoder with weights large enough that its next-token distribution is sharp (a default init gives
  a near-uniform one, where no update is visible) and its MLPs matter to the output."""
  m = init_model(c.model_config(), seed=c.seed)
  rng = np.random.default_rng(c.seed)
  m.embed_tokens.embedding.value = jnp.asarray(rng.normal(0, 0.5, (c.vocab, c.hidden)), jnp.float32)
  for layer in m.layers:
    for name, std in (("gate_proj", 0.3), ("up_proj", 0.3), ("down_proj", 0.1)):
      lin = getattr(layer.mlp, name)
      lin.kernel.value = jnp.asarray(rng.normal(0, std, lin.kernel.value.shape), jnp.float32)
  return m


def planted_update(c: Control, layer: int) -> np.ndarray:
  """dW [F, D] = scale U V^T with orthonormal U [F, k], V [D, k]: exactly rank k, each singular value `scale`."""
  rng = np.random.default_rng(1000 + 7 * c.seed + layer)
  u_Fk = np.linalg.qr(rng.normal(size=(c.mlp, c.rank)))[0]
  v_Dk = np.linalg.qr(rng.normal(size=(c.hidden, c.rank)))[0]
  return (c.scale * u_Fk @ v_Dk.T).astype(np.float32)


def teacher_model(c: Control) -> Decoder:
  m = base_model(c)
  for i, layer in enumerate(m.layers):
    lin = layer.mlp.down_proj
    lin.kernel.value = lin.kernel.value + planted_update(c, i)
  return m


def sampler(model: Decoder, batch: int, length: int):
  """key -> [B, length + 1] documents: BOS, then ancestral samples at temperature 1 (full recompute per token:
  the model is tiny and the documents short)."""
  graphdef, state = nnx.split(model)
  bos = model.config.bos_token_id

  @jax.jit
  def sample(key):
    tokens_BT = jnp.zeros((batch, length + 1), jnp.int32).at[:, 0].set(bos)
    pos_BT = jnp.broadcast_to(jnp.arange(length + 1, dtype=jnp.int32), tokens_BT.shape)
    seg_BT = jnp.ones_like(tokens_BT)

    def body(t, carry):
      tokens_BT, key = carry
      key, sub = jax.random.split(key)
      logits_BV = nnx.merge(graphdef, state)(tokens_BT, pos_BT, seg_BT)[:, t]
      return tokens_BT.at[:, t + 1].set(jax.random.categorical(sub, logits_BV)), key

    return jax.lax.fori_loop(0, length, body, (tokens_BT, key))[0]

  return sample


def as_batch(docs_BT) -> dict:
  """Documents of one row each, under the batch contract."""
  return whole_rows(docs_BT)


def mean_nll(model: Decoder, batch: dict) -> float:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  s, n = jax.jit(make_eval_step(graphdef))(nnx.to_pure_dict(params), nnx.to_pure_dict(rest), batch)
  return float(s / n)


def teacher_corpus(c: Control, docs: int, seed: int, chunk: int = 1024) -> np.ndarray:
  """[docs, length + 1] teacher samples, drawn in chunks (one compiled sampler)."""
  draw = sampler(teacher_model(c), chunk, c.length)
  parts = [np.asarray(draw(jax.random.key(seed * 100_003 + i))) for i in range(-(-docs // chunk))]
  return np.concatenate(parts)[:docs]


def continual_pretrain(c: Control, arm: str, lr: float, steps: int, batch: int = 64, every: int = 50,
                       held_docs: int = 512, corpus: np.ndarray | None = None) -> dict:
  """Train the base on teacher samples, each seen once (steps x batch documents); `arm` is "full" or "lora:<r>"
  (LoRA on the down projections, alpha = 2r). Returns the excess loss over the teacher on held-out teacher
  samples every `every` steps. Arms given the same `corpus` see the same documents in the same order."""
  teacher = teacher_model(c)
  held = as_batch(jnp.asarray(teacher_corpus(c, held_docs, seed=1 + c.seed)))
  floor = mean_nll(teacher, held)
  if corpus is None:
    corpus = teacher_corpus(c, steps * batch, seed=2 + c.seed)
  if len(corpus) < steps * batch:
    raise ValueError(f"corpus: {len(corpus)} documents for {steps} steps x {batch}")
  student = base_model(c)
  mode = "full" if arm == "full" else "lora"
  if mode == "lora":
    r = int(arm.split(":")[1])
    add_lora(student, r, 2.0 * r, "down_proj", seed=c.seed)
  graphdef, params, frozen = nnx.split(student, trainable_filter(mode, ""), ...)
  frozen = nnx.to_pure_dict(frozen)
  tx = optax.adam(lr)
  state = init_state(nnx.to_pure_dict(params), tx)
  train_step, eval_step = jax.jit(make_train_step(graphdef, tx, 1)), jax.jit(make_eval_step(graphdef))

  def excess():
    s, n = eval_step(state["params"], frozen, held)
    return float(s / n) - floor

  curve = [(0, excess())]
  for i in range(1, steps + 1):
    state, _ = train_step(state, frozen, as_batch(jnp.asarray(corpus[(i - 1) * batch: i * batch])))
    if i % every == 0 or i == steps:
      curve.append((i, excess()))
  return {"arm": arm, "lr": lr, "teacher_nll": floor, "curve": curve, "tokens_per_step": batch * c.length}


ARMS = (("full", 3e-3), ("lora:1", 1e-2), ("lora:2", 1e-2), ("lora:4", 1e-2))


@cli
def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m jaxtele.eval.control", description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--rank", type=int, default=2, help="the planted rank k")
  ap.add_argument("--seeds", type=int, default=2)
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)
  os.makedirs(args.out, exist_ok=True)
  results = []
  for seed in range(args.seeds):
    c = Control(rank=args.rank, seed=seed)
    corpus = teacher_corpus(c, args.steps * 64, seed=2 + seed)
    for arm, lr in ARMS:
      t0 = time.time()
      results.append(continual_pretrain(c, arm, lr, args.steps, corpus=corpus) | {"seed": seed,
                                                                                   "seconds": time.time() - t0})
      log(f"seed {seed} {arm:7s} lr {lr:g}: excess {results[-1]['curve'][0][1]:.4f} -> "
          f"{results[-1]['curve'][-1][1]:.4f} nats/token ({time.time() - t0:.0f} s)")
  with open(os.path.join(args.out, "control.json"), "w") as f:
    json.dump({"control": dataclasses.asdict(Control(rank=args.rank)), "results": results}, f, indent=1)
  plot(results, args.rank, os.path.join(args.out, "control.png"))
  return 0


def plot(results, k: int, path: str):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  colors = {}
  for r in results:
    steps, excess = zip(*r["curve"])
    tokens = [s * r["tokens_per_step"] for s in steps]
    line, = ax.plot(tokens, excess, color=colors.get(r["arm"]), alpha=0.8,
                    label=f"{r['arm']} (lr {r['lr']:g})" if r["arm"] not in colors else None)
    colors[r["arm"]] = line.get_color()
  ax.set_yscale("log")
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("NLL(student) - NLL(teacher), nats/token")
  ax.set_title(f"Positive control: planted rank k={k} update in the MLPs")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  sys.exit(main())
