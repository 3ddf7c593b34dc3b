"""Training-step benchmark, jaxtele beside PyTorch `transformers` (+ `peft`) on the same shapes and batch.

  python -m jaxtele.benchmarks.train --preset smollm2-135m --seq-len 256 --batch 4            # CPU row
  python -m jaxtele.benchmarks.train --preset smollm2-135m --seq-len 2048 --batch 8 --dtype bfloat16
  python -m jaxtele.benchmarks.train --preset qwen2.5-1.5b --seq-len 2048 --batch 4 --dtype bfloat16 --remat full

Rows: full fine-tuning and LoRA (rank --rank on every linear layer but the head), random weights of the
preset's architecture on packed rows (`benchmarks/batches.py`), AdamW. Each row runs in its own process (so
peak memory is its own): compile time, then --warmup steps, then the median of --steps synced steps. Tokens
count every input token; MFU as `jaxtele.metrics` counts it, for both sides. The same row runs in
`benchmarks/torch_reference.py` once per --torch-rows entry (stock eager or `torch.compile`; the packed batch
under a dense mask, or plain causal rows), each labelled with the SDPA backend torch used, and the table prints
jaxtele / that row's tokens/s.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


class Cfg(dict):
  """The few config keys `build.split_model` and `make_optimizer` read, as attributes."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


def measure(args) -> dict:
  import jax

  from jaxtele import build
  from jaxtele.benchmarks.batches import packed_batch
  from jaxtele.metrics import flops_per_token, peak_flops
  from jaxtele.models.decoder import init_model
  from jaxtele.models.lora import add_lora
  from jaxtele.models.presets import PRESETS
  from jaxtele.optimizer import make_optimizer
  from jaxtele.step import init_state, make_train_step

  model_cfg = PRESETS[args.preset].replace(param_dtype="float32", dtype=args.dtype, remat=args.remat,
                                           attention=args.attention)
  # Plain attribute dicts, not ml_collections: the GPU image lacks it and the benchmark needs no flags.
  cfg = Cfg(train=Cfg(mode=args.mode), model=Cfg(dtype=args.dtype), lora=Cfg(extra_trainable="", base_dtype=args.dtype))
  model = init_model(model_cfg, seed=0)
  if args.mode == "lora":
    add_lora(model, args.rank, 2.0 * args.rank, "all-linear")
  graphdef, params, frozen = build.split_model(model, cfg)
  del model
  opt = Cfg(dict(lr=1e-5, schedule="constant", warmup_ratio=0.0, final_lr_ratio=1.0,
                                       weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip=1.0))
  tx, _ = make_optimizer(opt, 1000)
  state = init_state(params, tx)
  step = jax.jit(make_train_step(graphdef, tx, 1, loss=args.loss), donate_argnums=(0,))
  batch = {k: jax.numpy.asarray(v) for k, v in packed_batch(args.batch, args.seq_len, model_cfg.vocab_size).items()}
  t0 = time.perf_counter()
  state, m = step(state, frozen, batch)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    state, m = step(state, frozen, batch)
  jax.block_until_ready(m["loss"])
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = step(state, frozen, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  dt = statistics.median(times)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  peak = stats.get("peak_bytes_in_use") if stats else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  n_train = sum(x.size for x in jax.tree.leaves(params))
  tps = args.batch * args.seq_len / dt
  fpt = flops_per_token(model_cfg, args.seq_len, args.mode, n_train if args.mode == "lora" else 0)
  peak_f = peak_flops(dev)
  return {"impl": "jaxtele", "mode": args.mode, "device": dev.device_kind, "attention": attention_label(model_cfg),
          "rows": "packed (segment ids)", "tokens_per_s": tps, "step_ms": 1000 * dt,
          "compile_s": compile_s, "peak_bytes": peak, "peak_kind": "device" if stats else "RSS",
          "mfu": tps * fpt / peak_f if peak_f else None, "loss": float(m["loss"]), "trainable_params": n_train,
          "total_params": n_train + sum(x.size for x in jax.tree.leaves(frozen)),
          "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))),
          "jax": jax.__version__}


def attention_label(model_cfg) -> str:
  """The implementation `attention=auto` resolves to here (a label; never fails the row)."""
  try:
    from jaxtele.models.attention import resolve_attention

    return resolve_attention(model_cfg.attention, model_cfg.dtype, model_cfg.head_dim, model_cfg.sliding_window)
  except Exception:  # noqa: BLE001 - only a label
    return model_cfg.attention


def run_row(module: str, argv: list, mode: str, timeout: float | None = None) -> dict | str:
  """One row in its own process (its own peak memory); a failure or timeout comes back as a one-line string."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  try:
    out = subprocess.run([sys.executable, "-m", module, *argv, "--mode", mode], capture_output=True, text=True,
                         env=env, check=False, timeout=timeout)
  except subprocess.TimeoutExpired:
    return f"timed out after {timeout:.0f} s"
  if out.returncode:
    last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit status {out.returncode}"
    return f"failed: {last[:300]}"
  try:
    return json.loads(out.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    return f"failed: no result line ({out.stdout[-200:]!r})"


def common_args(p):
  p.add_argument("--preset", default="smollm2-135m")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--steps", type=int, default=20, help="timed steps (each synced); the median is reported")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--remat", default="none", help="none | full | dots_saveable | ... (torch: checkpointing on/off)")
  p.add_argument("--mode", help=argparse.SUPPRESS)


TABLE_HEAD = ("| mode | impl | attention | rows | tokens/s | step ms | MFU | first step (compile) s | peak memory GiB "
              "| optimizer MiB | jaxtele / this |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def table_row(mode: str, r, ours=None, label: str = "") -> str:
  """A Markdown row; `ours` (the jaxtele row of the same mode) gives the ratio on a torch row."""
  if not isinstance(r, dict):
    return f"| {mode} | {label} | | | {r} | | | | | | |"
  ratio = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if isinstance(ours, dict) and ours is not r else ""
  mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
  return (f"| {mode} | {r['impl']} | {r.get('attention', '')} | {r.get('rows', '')} | {r['tokens_per_s']:,.0f} | "
          f"{r['step_ms']:.1f} | {mfu} | {r['compile_s']:.1f} | {r['peak_bytes'] / 2**30:.2f} ({r['peak_kind']}) | "
          f"{r['optimizer_state_bytes'] / 2**20:,.1f} | {ratio} |")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common_args(p)
  p.add_argument("--attention", default="auto")
  p.add_argument("--loss", default="plain", choices=("plain", "chunked"))
  p.add_argument("--modes", default="full,lora")
  p.add_argument("--torch-rows", default="eager:packed,compile:packed,eager:causal",
                 help="torch rows as MODE:ROWS (eager|compile : packed|causal), comma-separated; '' for none")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--json", help="also write the rows here")
  args = p.parse_args()
  if args.mode:
    print(json.dumps(measure(args)))
    return
  shared = ["--preset", args.preset, "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank), "--dtype", args.dtype,
            "--remat", args.remat]
  torch_rows = [] if args.no_torch else [t.split(":") for t in args.torch_rows.split(",") if t]
  rows = []
  for mode in args.modes.split(","):
    ours = run_row("jaxtele.benchmarks.train", shared + ["--attention", args.attention, "--loss", args.loss], mode)
    theirs = [run_row("jaxtele.benchmarks.torch_reference", shared + ["--torch-mode", tm, "--rows", tr], mode)
              for tm, tr in torch_rows]
    rows.append((mode, ours, theirs))
    print(json.dumps({"mode": mode, "jaxtele": ours, "torch": theirs}), file=sys.stderr, flush=True)
  device = next((r["device"] for _, r, _ in rows if isinstance(r, dict)), "?")
  print(f"\n{args.preset} on {device}: seq {args.seq_len} x batch {args.batch}, {args.dtype}, remat "
        f"{args.remat}, attention {args.attention}, loss {args.loss}, LoRA r={args.rank} all-linear; median of "
        f"{args.steps} synced steps after {args.warmup} warm-up\n")
  print(TABLE_HEAD)
  for mode, ours, theirs in rows:
    print(table_row(mode, ours, label="jaxtele"))
    for (tm, tr), r in zip(torch_rows, theirs):
      print(table_row(mode, r, ours, label=f"torch {tm} {tr}"))
  if args.json:
    with open(args.json, "w") as f:
      json.dump([{"mode": m, "jaxtele": o, "torch": t} for m, o, t in rows], f, indent=2)


if __name__ == "__main__":
  main()
