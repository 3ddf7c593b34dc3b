"""Compile time of a full train step with and without `model.scan_layers`, and optionally its step time.

  python -m jaxtele.benchmarks.compile                          # SmolLM2-135M shape, seq 256, batch 2, fp32
  python -m jaxtele.benchmarks.compile --remat none,full --steps 3 --repeat 2

Rows: remat policy x scan. Trace+lower is `jax.jit(step).lower(...)` (Python tracing and StableHLO), compile
is `.compile()` (XLA), both on shape-only inputs (nothing large is allocated); cpu s is the process's CPU
time for both (less sensitive than wall time to other jobs on a shared machine). With --steps N the step also
runs on random weights: the median of N synced steps after one warm-up, which shows what stacking the layer
weights inside the step costs. --repeat runs every row again (a shared machine's noise shows as spread).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxtele import step as step_lib
from jaxtele.benchmarks.memory import abstract_step_inputs
from jaxtele.models.presets import PRESETS


def model_config(preset: str, dtype: str, remat: str, scan: bool):
  return PRESETS[preset].replace(dtype=dtype, param_dtype="float32", remat=remat, attention="xla",
                                 scan_layers=scan)


def measure(preset: str, dtype: str, remat: str, scan: bool, batch: int, seq: int, steps: int) -> dict:
  cfg = model_config(preset, dtype, remat, scan)
  graphdef, tx, state, frozen, batch_spec = abstract_step_inputs(cfg, "xla", batch, seq)
  fn = jax.jit(step_lib.make_train_step(graphdef, tx, 1), donate_argnums=(0,))
  t0, c0 = time.perf_counter(), time.process_time()
  lowered = fn.lower(state, frozen, batch_spec)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2, c2 = time.perf_counter(), time.process_time()
  row = {"lower_s": t1 - t0, "compile_s": t2 - t1, "cpu_s": c2 - c0, "step_s": None}
  if steps:
    row["step_s"] = _step_time(compiled, cfg, batch, seq, steps)
  return row


def _step_time(compiled, cfg, batch: int, seq: int, steps: int) -> float:
  from flax import nnx

  from jaxtele.benchmarks.batches import packed_batch
  from jaxtele.config import default_config
  from jaxtele.optimizer import make_optimizer
  from jaxtele.models.decoder import init_model

  graphdef, params, frozen = nnx.split(init_model(cfg), nnx.Param, ...)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  tx, _ = make_optimizer(default_config().optimizer, 1000)
  state = step_lib.init_state(params, tx)
  data = {k: jnp.asarray(v) for k, v in packed_batch(batch, seq, cfg.vocab_size).items()}
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    state, m = compiled(state, frozen, data)
    jax.block_until_ready(m["loss"])
    if i:  # the first call pays for allocation
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS))
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none", help="comma-separated remat policies")
  p.add_argument("--steps", type=int, default=0, help="also time N train steps on random weights")
  p.add_argument("--repeat", type=int, default=1)
  args = p.parse_args(argv)
  print(f"{args.preset} shape, full FT, batch {args.batch} x seq {args.seq}, {args.dtype} compute, xla attention, "
        f"backend={jax.default_backend()}, jax {jax.__version__}")
  print(f"{'remat':<12} {'scan':<6} {'lower s':>8} {'compile s':>10} {'total s':>8} {'cpu s':>7} {'step s':>8}")
  for rep in range(args.repeat):
    for remat in args.remat.split(","):
      for scan in (False, True):
        r = measure(args.preset, args.dtype, remat, scan, args.batch, args.seq, args.steps)
        step = f"{r['step_s']:8.2f}" if r["step_s"] is not None else f"{'-':>8}"
        print(f"{remat:<12} {str(scan):<6} {r['lower_s']:8.1f} {r['compile_s']:10.1f} "
              f"{r['lower_s'] + r['compile_s']:8.1f} {r['cpu_s']:7.1f} {step}", flush=True)


if __name__ == "__main__":
  main()
