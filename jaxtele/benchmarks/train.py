"""Training step throughput and memory, full fine-tuning vs LoRA, on one device.

  python -m jaxtele.benchmarks.train                       # the quickstart's tiny model, CPU-sized
  python -m jaxtele.benchmarks.train --source MODEL.gguf --seq-len 2048 --batch 8 --dtype bfloat16

Each mode runs in its own process so peak memory is its own: peak RSS on CPU, the device allocator's
peak on GPU/TPU. The step is the trainer's (`jaxtele.step.make_train_step`); batches are random tokens
so the input pipeline is not measured here (see benchmarks/data.py).
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxtele import build
  from jaxtele.config import default_config, load_config
  from jaxtele.optimizer import make_optimizer
  from jaxtele.step import init_state, make_train_step

  cfg = load_config("configs/quickstart.py") if not args.source else default_config()
  cfg.model.update(source=args.source, dtype=args.dtype, remat=args.remat)
  cfg.train.mode = args.mode
  cfg.lora.update(rank=args.rank, alpha=2.0 * args.rank, targets="all-linear", base_dtype=args.dtype)
  model = build.build_model(cfg)
  graphdef, params, frozen = build.split_model(model, cfg)
  del model
  tx, _ = make_optimizer(cfg.optimizer, 1000)
  state = init_state(params, tx)
  step = jax.jit(make_train_step(graphdef, tx, 1), donate_argnums=(0,))
  B, T = args.batch, args.seq_len
  V = build.model_config(cfg.model).vocab_size
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, V, (B, T)), "targets": rng.integers(0, V, (B, T)),
           "segment_ids": np.ones((B, T)), "positions": np.tile(np.arange(T), (B, 1)), "loss_mask": np.ones((B, T))}
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
  t0 = time.perf_counter()
  state, m = step(state, frozen, batch)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, frozen, batch)
  jax.block_until_ready(m["loss"])
  dt = (time.perf_counter() - t0) / args.steps
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  peak = stats.get("peak_bytes_in_use") if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {"mode": args.mode, "device": dev.device_kind, "tokens_per_s": B * T / dt, "step_ms": 1000 * dt,
          "compile_s": compile_s, "peak_bytes": peak, "peak_kind": "device" if stats else "RSS",
          "trainable_params": sum(x.size for x in jax.tree.leaves(params)),
          "total_params": sum(x.size for x in jax.tree.leaves(params)) + sum(x.size for x in jax.tree.leaves(frozen)),
          "optimizer_state_bytes": nbytes(state["opt_state"])}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--source", default="", help="model to load (default: the quickstart's tiny model)")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--mode", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.mode:
    print(json.dumps(measure(args)))
    return
  rows = []
  for mode in ("full", "lora"):
    out = subprocess.run([sys.executable, "-m", "jaxtele.benchmarks.train", *sys.argv[1:], "--mode", mode],
                         capture_output=True, text=True, check=False)
    if out.returncode:
      sys.exit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f"\n{rows[0]['device']}, seq {args.seq_len} x batch {args.batch}, compute {args.dtype}, "
        f"LoRA r={args.rank} on all linear layers, {args.steps} timed steps after compilation\n")
  print("| mode | trainable / total params | tokens/s | step ms | peak memory (GiB) | optimizer state (MiB) |")
  print("|---|---|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['mode']} | {r['trainable_params']:,} / {r['total_params']:,} | {r['tokens_per_s']:,.0f} | "
          f"{r['step_ms']:.1f} | {r['peak_bytes'] / 2**30:.2f} ({r['peak_kind']}) | "
          f"{r['optimizer_state_bytes'] / 2**20:.2f} |")


if __name__ == "__main__":
  main()
