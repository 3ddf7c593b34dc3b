"""Scanning the decoder's layers: XLA compiles one layer body instead of one per layer (`model.scan_layers`).

The parameter tree stays per layer (`layers.{i}.self_attn.q_proj...`): sharding rules, checkpoints, the HF /
PEFT / GGUF converters and the trainable filter never see a stacked leaf. Inside the traced forward the layers'
states are stacked (`jnp.stack` over the per-layer leaves) and one layer module is scanned over them;
gradients flow back to the per-layer leaves through the stack. The copy costs one pass over the layer weights
per step (measured in docs/benchmarks.md), which storing the tree stacked would avoid at the price of every
consumer of the tree.

What differs between layers statically (Gemma 2/3's sliding window and RoPE base, an adapter on some layers
only, anything in a layer's graph definition or leaf shapes) is not made a traced input: the fused attention
kernels (cuDNN, Pallas, splash) take their window at trace time. Instead the scanned unit is a *group* of
`period` consecutive layers, the smallest period after which the layers repeat exactly (1 for Llama, 2 for
Gemma 2, 6 for Gemma 3), unrolled inside the scan body; layers left over after the last whole group run
unrolled after the scan. A stack without a repeating pattern (fewer than two groups) runs unrolled.
Shape letters: jaxtele/models/__init__.py.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtele.models import adapters


def _signature(layer):
  """What two layers must share to run under one scanned body: graph definition and leaf shapes/dtypes."""
  leaves = jax.tree.leaves(nnx.state(layer))
  return nnx.graphdef(layer), tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


def layer_period(layers) -> int:
  """The smallest P such that layer i and layer i + P are interchangeable for every i (len(layers): none)."""
  sigs = [_signature(layer) for layer in layers]
  L = len(sigs)
  for p in range(1, L):
    if all(sigs[i] == sigs[i + p] for i in range(L - p)):
      return p
  return L


def scan_plan(layers) -> tuple[int, int]:
  """-> (period P, groups Y): layers [0, P*Y) run as Y scanned groups of P; Y < 2 means run unrolled."""
  p = layer_period(layers)
  return p, len(layers) // p


def run_layers(layers, block, x_BTD, *args, scan: bool = True):
  """x -> block(layer_L-1, ... block(layer_0, x, *args, calls) ...), scanned by groups where the layers repeat
  (scan=False: the plain loop).

  `block(layer, x, *args, calls) -> (x, calls)` threads the adapters' dropout call counter (None without
  dropout) so each layer draws the same masks as in the unrolled loop: the count enters the trace as a value.
  """
  p, n = scan_plan(layers) if scan else (len(layers), 1)
  calls = adapters.dropout_calls()
  if n < 2:
    for layer in layers:
      x_BTD, calls = block(layer, x_BTD, *args, calls)
    adapters.set_dropout_calls(calls)
    return x_BTD
  if calls is not None:
    calls = jnp.asarray(calls, jnp.int32)
  splits = [nnx.split(layer) for layer in layers[:p * n]]
  graphdefs = [graphdef for graphdef, _ in splits[:p]]
  stack = lambda *leaves: jnp.stack(leaves)
  # stacked[j]: the states of layers j, P + j, 2P + j, ... with a leading [Y] axis.
  stacked = tuple(jax.tree.map(stack, *[splits[g * p + j][1] for g in range(n)]) for j in range(p))

  def group(carry, states):
    x_BTD, calls = carry
    for graphdef, state in zip(graphdefs, states):
      x_BTD, calls = block(nnx.merge(graphdef, state), x_BTD, *args, calls)
    return (x_BTD, calls), None

  (x_BTD, calls), _ = jax.lax.scan(group, (x_BTD, calls), stacked)
  for layer in layers[p * n:]:
    x_BTD, calls = block(layer, x_BTD, *args, calls)
  adapters.set_dropout_calls(calls)
  return x_BTD
