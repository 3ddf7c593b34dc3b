"""The prepared GPU suite: one command, a time budget, a row saved the moment it finishes, a table at the end.

  python -m jaxtele.benchmarks.device --out DIR            # one H200: <= 8 minutes (--budget-s)
  python -m jaxtele.benchmarks.device --out DIR --smoke    # tiny preset on CPU, seconds (the tests run it)
  launch/gpu_suite.sh DIR                                  # the same from a source tree on the GPU image

1. `benchmarks/checks.py` in one process: the environment probe (versions, device kind, XLA_FLAGS, matmul
   precision) and the kernel checks (every attention implementation at the real head shapes vs an fp32
   reference, a segment-erased run that must differ, the chunked loss vs the plain one); a failing check is
   recorded and the next one runs.
2. Benchmark rows, each in its own process (`benchmarks/train.py` and `benchmarks/torch_reference.py`):
   jaxtele, stock torch eager + SDPA and `torch.compile`, for SmolLM2-135M and Qwen2.5-1.5B, full and LoRA
   r=64 all-linear, seq 2048, bf16, random weights of the real architecture (no weights travel), in priority
   order. A row starts only when the budget left covers its usual need, and is stopped at its cap or at the
   budget's end; skipped and stopped rows are recorded as such.
Writes DIR/log.txt (everything, as it happens), DIR/rows/<name>.json (one per row), DIR/summary.json and
DIR/table.md. Exit status 0 when nothing failed, 1 when a row failed, 2 on bad input.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

from jaxtele.benchmarks import checks
from jaxtele.benchmarks.train import run_row
from jaxtele.errors import JaxteleError, cli

# (preset, mode, side, batch, need_s, cap_s): need_s = the least a row usually takes, cap_s = when it is stopped.
GPU_ROWS = [
    ("smollm2-135m", "full", "jaxtele", 8, 45, 150),
    ("smollm2-135m", "full", "torch-eager-packed", 8, 25, 90),
    ("smollm2-135m", "full", "torch-compile-packed", 8, 60, 150),
    ("qwen2.5-1.5b", "full", "jaxtele", 4, 45, 150),
    ("qwen2.5-1.5b", "full", "torch-eager-packed", 4, 30, 90),
    ("smollm2-135m", "lora", "jaxtele", 8, 45, 150),
    ("smollm2-135m", "lora", "torch-eager-packed", 8, 25, 90),
    ("qwen2.5-1.5b", "lora", "jaxtele", 4, 45, 150),
    ("qwen2.5-1.5b", "lora", "torch-eager-packed", 4, 30, 90),
    ("qwen2.5-1.5b", "full", "torch-compile-packed", 4, 60, 150),
    ("smollm2-135m", "full", "torch-eager-causal", 8, 25, 90),
    ("smollm2-135m", "lora", "torch-compile-packed", 8, 60, 150),
    ("qwen2.5-1.5b", "lora", "torch-compile-packed", 4, 60, 150),
]
# Smoke caps are generous: a shared 2-core machine can be 20x slower than idle.
SMOKE_ROWS = [("tiny", "full", "jaxtele", 2, 5, 600), ("tiny", "full", "torch-eager-packed", 2, 5, 600),
              ("tiny", "lora", "jaxtele", 2, 5, 600), ("tiny", "lora", "torch-eager-packed", 2, 5, 600)]
GPU_SHAPE = dict(seq_len=2048, steps=10, warmup=2, dtype="bfloat16")
SMOKE_SHAPE = dict(seq_len=32, steps=1, warmup=0, dtype="bfloat16")


class Log:
  """Prints and appends to DIR/log.txt, flushed per line so a killed run keeps what it did."""

  def __init__(self, path):
    self.path, self.f = path, open(path, "a", buffering=1)

  def __call__(self, msg: str):
    print(msg, flush=True)
    self.f.write(msg + "\n")


def row_name(preset, mode, side) -> str:
  return f"bench_{preset}_{mode}_{side}"


def bench_argv(preset, mode, side, batch, shape, rank: int):
  args = ["--preset", preset, "--seq-len", str(shape["seq_len"]), "--batch", str(batch), "--steps",
          str(shape["steps"]), "--warmup", str(shape["warmup"]), "--rank", str(rank), "--dtype", shape["dtype"],
          "--remat", "none"]
  if side == "jaxtele":
    return "jaxtele.benchmarks.train", args + ["--attention", "auto", "--loss", "plain"]
  _, torch_mode, rows = side.split("-")
  return "jaxtele.benchmarks.torch_reference", args + ["--torch-mode", torch_mode, "--rows", rows]


def save(out, row: dict):
  with open(os.path.join(out, "rows", f"{row['name']}.json"), "w") as f:
    json.dump(row, f, indent=1)


def run_checks(args, log, deadline) -> list[dict]:
  """The checks process, its output streamed into the log; rows it never wrote are recorded as not run."""
  cmd = [sys.executable, "-m", "jaxtele.benchmarks.checks", "--out", args.out] + (["--smoke"] if args.smoke else [])
  if args.fail:
    cmd += ["--fail", args.fail]
  if args.hang:
    cmd += ["--hang", args.hang]
  if args.only:
    cmd += ["--only", args.only]
  timeout = max(min(args.checks_cap_s, deadline - time.time()), 1)
  log(f"checks: {' '.join(cmd[1:])} (stopped after {timeout:.0f} s)")
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
    killed = threading.Event()
    # A hung kernel prints nothing, so the limit is kept from outside the read loop.
    watchdog = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
    watchdog.start()
    for line in proc.stdout:
      log("  " + line.rstrip())
    proc.wait()
    watchdog.cancel()
    stopped = killed.is_set()
  ended = f"stopped after {timeout:.0f} s" if stopped else f"exit status {proc.returncode}"
  rows = []
  files = [os.path.join(args.out, "rows", n) for n in os.listdir(os.path.join(args.out, "rows"))]
  for path in sorted(files, key=os.path.getmtime):  # in the order they were run
    with open(path) as f:
      rows.append(json.load(f))
  if stopped or not any(r.get("kind") == "env" for r in rows) or proc.returncode not in (0, 1):
    row = {"name": "checks_process", "kind": "check", "status": "fail", "detail": f"checks process: {ended}"}
    save(args.out, row)
    rows.append(row)
    for name, _ in checks.plan(args.smoke):  # name what never ran
      if (not args.only or re.search(args.only, name)) and not any(r["name"].startswith(name) for r in rows):
        rows.append({"name": name, "kind": "check", "status": "skip", "detail": f"not run: checks process {ended}"})
        save(args.out, rows[-1])
  return rows


def run_bench(args, log, deadline) -> list[dict]:
  plan, shape = (SMOKE_ROWS, SMOKE_SHAPE) if args.smoke else (GPU_ROWS, GPU_SHAPE)
  rows, ours = [], {}
  for preset, mode, side, batch, need_s, cap_s in plan:
    name = row_name(preset, mode, side)
    if args.only and not re.search(args.only, name):
      continue
    left = deadline - time.time()
    row = {"name": name, "kind": "bench", "preset": preset, "mode": mode, "side": side, "batch": batch, **shape}
    if left < need_s:
      row.update(status="skip", detail=f"budget: {left:.0f} s left < {need_s} s this row needs")
    else:
      module, argv = bench_argv(preset, mode, side, batch, shape, args.rank)
      t0 = time.time()
      result = run_row(module, argv, mode, timeout=min(cap_s, left))
      row["seconds"] = round(time.time() - t0, 1)
      if isinstance(result, dict):
        row.update(status="pass", result=result)
        if side == "jaxtele":
          ours[(preset, mode)] = result
        elif (preset, mode) in ours:
          row["jaxtele_over_this"] = ours[(preset, mode)]["tokens_per_s"] / result["tokens_per_s"]
      else:
        row.update(status="fail", detail=result)
    save(args.out, row)
    log(f"{name}: {row['status']} {format_bench(row)}")
    rows.append(row)
  return rows


def format_bench(row) -> str:
  r = row.get("result")
  if not r:
    return row.get("detail", "")
  mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
  ratio = f", jaxtele/this {row['jaxtele_over_this']:.2f}x" if "jaxtele_over_this" in row else ""
  return (f"{r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, peak {r['peak_bytes'] / 2**30:.2f} GiB ({r['peak_kind']}), "
          f"first step {r['compile_s']:.1f} s, attention {r.get('attention', '?')}, {r.get('rows', '')}{ratio}")


def table(rows) -> str:
  env = next((r for r in rows if r.get("kind") == "env"), {})
  v = env.get("versions", {})
  lines = [f"{env.get('device_kind', '?')} x{env.get('device_count', '?')} ({env.get('backend', '?')}), python "
           f"{env.get('python', '?')}, " + ", ".join(f"{k} {x}" for k, x in v.items())
           + f"; XLA_FLAGS={env.get('xla_flags', '')!r}; matmul precision {env.get('matmul_precision', '?')}", "",
           "| check | status | max err | tol | detail |", "|---|---|---:|---:|---|"]
  for r in rows:
    if r.get("kind") == "check":
      err = f"{r['max_err']:.2e}" if "max_err" in r else ""
      tol = f"{r['tol']:.0e}" if "tol" in r else ""
      lines.append(f"| {r['name']} | {r['status']} | {err} | {tol} | {r.get('detail', '')} |")
  lines += ["", "| preset | mode | side | attention | rows | tokens/s | MFU | peak GiB | first step s | jaxtele / this |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r.get("kind") != "bench":
      continue
    x = r.get("result")
    if not x:
      lines.append(f"| {r['preset']} | {r['mode']} | {r['side']} | {r['status']}: {r.get('detail', '')} | | | | | | |")
      continue
    mfu = f"{x['mfu']:.1%}" if x.get("mfu") is not None else "-"
    ratio = f"{r['jaxtele_over_this']:.2f}x" if "jaxtele_over_this" in r else ""
    lines.append(f"| {r['preset']} | {r['mode']} | {r['side']} | {x.get('attention', '')} | {x.get('rows', '')} | "
                 f"{x['tokens_per_s']:,.0f} | {mfu} | {x['peak_bytes'] / 2**30:.2f} | {x['compile_s']:.1f} | {ratio} |")
  return "\n".join(lines)


def check_out(out: str, overwrite: bool):
  """Never writes over an earlier suite's results unless asked to."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise JaxteleError(f"--out {out}: exists and is not a folder")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise JaxteleError(f"--out {out}: folder is not empty (pass --overwrite to replace its results)")
  os.makedirs(os.path.join(out, "rows"), exist_ok=True)
  if overwrite:
    for name in os.listdir(os.path.join(out, "rows")):
      os.remove(os.path.join(out, "rows", name))
    for name in ("log.txt", "summary.json", "table.md"):
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))


@cli
def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="folder for log.txt, rows/*.json, summary.json, table.md")
  p.add_argument("--smoke", action="store_true", help="tiny preset on CPU: checks the suite itself, in seconds")
  p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of the whole suite")
  p.add_argument("--checks-cap-s", type=float, default=150.0, help="the kernel checks' share of the budget")
  p.add_argument("--rank", type=int, default=64)
  p.add_argument("--only", default="", help="regex: run only the checks and rows whose names match")
  p.add_argument("--fail", default="", help="make the check of this name raise (tests the failure path)")
  p.add_argument("--hang", default="", help="make the check of this name hang (tests the stop path)")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args()
  if args.budget_s <= 0:
    raise JaxteleError(f"--budget-s: must be positive, got {args.budget_s}")
  try:
    re.compile(args.only)
  except re.error as e:
    raise JaxteleError(f"--only: not a regular expression: {e}") from e
  check_out(args.out, args.overwrite)
  deadline = time.time() + args.budget_s
  log = Log(os.path.join(args.out, "log.txt"))
  log(f"jaxtele device suite{' (smoke)' if args.smoke else ''}: budget {args.budget_s:.0f} s, out {args.out}")
  rows = run_checks(args, log, deadline)
  rows += run_bench(args, log, deadline)
  text = table(rows)
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(text + "\n")
  failed = [r["name"] for r in rows if r.get("status") == "fail"]
  log(f"\n{text}\n\n{len(rows)} rows, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
      f"{args.budget_s - (deadline - time.time()):.0f} s")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
