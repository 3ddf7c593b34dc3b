"""Compiled memory of a full train step, without a GPU: XLA's `memory_analysis()` of the lowered step.

  python -m jaxtele.benchmarks.memory                        # SmolLM2-135M shape, seq 2048, batch 1, bf16
  python -m jaxtele.benchmarks.memory --batch 4 --remat full --attention xla,pallas --loss plain,chunked

The model is SmolLM2-135M's architecture with shape-only leaves (nothing large is allocated): full
fine-tuning, fp32 master weights, AdamW state, bf16 compute. Rows: attention implementation x loss.
Temp bytes are the step's working memory (activations kept for the backward, logits); arguments are
params + optimizer state + batch. `pallas` lowers the interpreted kernel on CPU, so its temp bytes show
the flash kernel's structure (no [T, S] scores), not a GPU allocator's figure.
"""

import argparse
import functools
import time

import jax
from flax import nnx

from jaxtele import step as step_lib
from jaxtele.batch import abstract as abstract_batch
from jaxtele.config import default_config
from jaxtele.models.config import ModelConfig
from jaxtele.models.decoder import abstract_model
from jaxtele.models.presets import PRESETS
from jaxtele.optimizer import make_optimizer



def model_config(dtype: str, remat: str, attention: str) -> ModelConfig:
  return PRESETS["smollm2-135m"].replace(dtype=dtype, param_dtype="float32", remat=remat, attention=attention)


def abstract_step_inputs(cfg: ModelConfig, attention: str, batch: int, seq: int):
  model = abstract_model(cfg)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  tx, _ = make_optimizer(default_config().optimizer, 1000)
  state = jax.eval_shape(functools.partial(step_lib.init_state, tx=tx), params)
  return graphdef, tx, state, frozen, abstract_batch(batch, seq)


def measure(attention: str, loss: str, chunk: int, batch: int, seq: int, dtype: str, remat: str) -> dict:
  cfg = model_config(dtype, remat, attention)
  graphdef, tx, state, frozen, batch_spec = abstract_step_inputs(cfg, attention, batch, seq)
  t0 = time.perf_counter()
  train_step = step_lib.make_train_step(graphdef, tx, 1, loss=loss, chunk=chunk)
  compiled = jax.jit(train_step, donate_argnums=(0,)).lower(state, frozen, batch_spec).compile()
  mem = compiled.memory_analysis()
  return {"temp": mem.temp_size_in_bytes, "args": mem.argument_size_in_bytes, "out": mem.output_size_in_bytes,
          "compile_s": time.perf_counter() - t0}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", default="none", help="comma-separated remat policies (none, full, dots_saveable, ...)")
  p.add_argument("--attention", default="xla,pallas", help="comma-separated implementations")
  p.add_argument("--loss", default="plain,chunked", help="comma-separated: plain, chunked")
  p.add_argument("--chunk", type=int, default=1024, help="tokens per tile of the chunked loss")
  args = p.parse_args(argv)
  mib = lambda n: f"{n / 2**20:10.1f}"
  print(f"SmolLM2-135M shape, full FT, batch {args.batch} x seq {args.seq}, {args.dtype} compute, "
        f"backend={jax.default_backend()}")
  print(f"{'remat':<33} {'attention':<10} {'loss':<14} {'temp MiB':>10} {'args MiB':>10} {'out MiB':>10} "
        f"{'compile s':>10}")
  for remat in args.remat.split(","):
    for attention in args.attention.split(","):
      for loss in args.loss.split(","):
        label = f"{loss}({args.chunk})" if loss == "chunked" else loss
        row = f"{remat:<33} {attention:<10} {label:<14}"
        try:
          r = measure(attention, loss, args.chunk, args.batch, args.seq, args.dtype, remat)
        except Exception as e:  # a row that does not lower says why and the table goes on
          print(f"{row} does not lower here: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
          continue
        print(f"{row} {mib(r['temp'])} {mib(r['args'])} {mib(r['out'])} {r['compile_s']:10.1f}", flush=True)


if __name__ == "__main__":
  main()
