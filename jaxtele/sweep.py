"""`python -m jaxtele.sweep --config configs/experiments/<name>.py[:arg] [--list | --point I | --slurm | --summary]`

A sweep is a grid of ordinary runs, run as a resumable queue. Its recipe's `get_sweep(arg)` returns a dict:
  root        folder holding one run directory per point, and summary.json / summary.md
  recipe      the training recipe, "path[:arg]"; "{arm}" in it becomes the arm's name (e.g. "x.py:{arm}")
  arms        {arm: {dotted key: value}}: what tells the arms apart (e.g. train.mode, lora.rank)
  grid        {dotted key: [values]}: crossed with every arm (e.g. optimizer.lr)
  grids       {arm: {dotted key: [values]}}: an arm's own grid in place of `grid` (e.g. LoRA's higher rates)
  seeds       seeds run at every grid point (each sets `seed` and `data.seed`, so arms are paired by seed)
  best_seeds  extra seeds run only at each arm's best grid point, once the first stage is complete
  select      {"metric": "eval/<set>/loss", "mode": "min" | "max"}: what "best" means (final evaluation)
  compare     [[arm_a, arm_b], ...]: paired comparisons between the arms' chosen points (default: every pair)
Each point is a run directory `root/<arm>/<key>=<value>,...,seed=<s>`; the trainer resumes an interrupted point
from its latest checkpoint (exactly), and a finished point is never run again (`sweep_point.json` records how it
ended: `done`, or `failed` with the one-line error, e.g. a learning rate that diverged).
"""

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time

from jaxtele import progress
from jaxtele.errors import JaxteleError, cli
from jaxtele.sweep_summary import POINT_FILE, status, summarize, write_summary

KEYS = {"root", "recipe", "arms", "grid", "grids", "seeds", "best_seeds", "select", "compare"}


def load_sweep(path: str) -> dict:
  """The recipe's `get_sweep(arg)` with its keys checked; `path:arg` passes `arg`."""
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise JaxteleError(f"--config: no such sweep recipe {file}")
  spec = importlib.util.spec_from_file_location("jaxtele_sweep_recipe", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # the recipe's own error, at its line
    raise JaxteleError(f"{file}: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_sweep"):
    raise JaxteleError(f"{file}: a sweep recipe defines get_sweep()")
  sweep = dict(module.get_sweep(arg) if arg else module.get_sweep())
  unknown = set(sweep) - KEYS
  if unknown:
    raise JaxteleError(f"{file}: get_sweep(): unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(KEYS))})")
  for key in ("root", "recipe", "arms", "select"):
    if not sweep.get(key):
      raise JaxteleError(f"{file}: get_sweep(): {key!r} must be set")
  sweep.setdefault("grid", {})
  sweep["seeds"] = list(sweep.get("seeds") or [0])
  sweep["best_seeds"] = [s for s in sweep.get("best_seeds") or [] if s not in sweep["seeds"]]
  sel = sweep["select"]
  if not isinstance(sel, dict) or "metric" not in sel or sel.get("mode", "min") not in ("min", "max"):
    raise JaxteleError(f"{file}: get_sweep(): select must be {{'metric': KEY, 'mode': 'min' | 'max'}}, got {sel!r}")
  sweep["grids"] = dict(sweep.get("grids") or {})
  arms = list(sweep["arms"])
  for arm in sweep["grids"]:
    if arm not in arms:
      raise JaxteleError(f"{file}: get_sweep(): grids names {arm!r}, not an arm ({', '.join(arms)})")
  for where, grid in [("grid", sweep["grid"])] + [(f"grids[{a!r}]", g) for a, g in sweep["grids"].items()]:
    for key, values in grid.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise JaxteleError(f"{file}: get_sweep(): {where}[{key!r}] must be a non-empty list")
  for pair in sweep.get("compare") or []:
    for arm in pair:
      if arm not in arms:
        raise JaxteleError(f"{file}: get_sweep(): compare names {arm!r}, not an arm ({', '.join(arms)})")
  sweep["compare"] = [list(p) for p in sweep.get("compare") or itertools.combinations(arms, 2)]
  return sweep


def _fmt(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def point(sweep: dict, arm: str, combo: dict, seed: int) -> dict:
  """One grid point: its name, run directory and config overrides."""
  name = ",".join([f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in combo.items()] + [f"seed={seed}"])
  run_dir = os.path.join(sweep["root"], arm, name)
  settings = {**sweep["arms"][arm], **combo, "seed": seed, "data.seed": seed, "run_dir": run_dir}
  return {"arm": arm, "combo": combo, "seed": seed, "name": name, "run_dir": run_dir, "settings": settings}


def grid_of(sweep: dict, arm: str) -> dict:
  """The arm's grid: its own (`grids`) or the shared one."""
  return sweep.get("grids", {}).get(arm, sweep["grid"])


def combos(sweep: dict, arm: str) -> list[dict]:
  grid = grid_of(sweep, arm)
  return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def first_stage(sweep: dict) -> list[dict]:
  return [point(sweep, arm, combo, seed)
          for arm in sweep["arms"] for combo in combos(sweep, arm) for seed in sweep["seeds"]]


def second_stage(sweep: dict, summary: dict) -> list[dict]:
  """The extra seeds at each arm's best grid point (needs the first stage's summary)."""
  out = []
  for arm in sweep["arms"]:
    best = summary["arms"].get(arm, {}).get("best")
    if best is not None:
      out += [point(sweep, arm, best["combo"], seed) for seed in sweep["best_seeds"]]
  return out


def _override(key: str, value) -> str:
  return f"--config.{key}={value if isinstance(value, str) else repr(value)}"


def run_point(sweep: dict, p: dict, log) -> str:
  """Train one point in this process; a run that fails (a diverged learning rate) is recorded, not fatal."""
  from jaxtele.config import load_config
  from jaxtele.train import run

  recipe = sweep["recipe"].replace("{arm}", p["arm"])
  cfg = load_config(recipe, [_override(k, v) for k, v in p["settings"].items()])
  t0 = time.time()
  try:
    run(cfg)
    outcome = {"status": "done"}
  except JaxteleError as e:
    outcome = {"status": "failed", "error": str(e)}
    log(f"sweep: {p['arm']}/{p['name']} failed: {e}")
  os.makedirs(p["run_dir"], exist_ok=True)
  record = {**outcome, "arm": p["arm"], "name": p["name"], "settings": p["settings"],
            "seconds": round(time.time() - t0, 1)}
  tmp = os.path.join(p["run_dir"], POINT_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(p["run_dir"], POINT_FILE))
  return outcome["status"]


def all_points(sweep: dict) -> tuple[list, bool]:
  """(every point known so far, whether the second stage could be planned)."""
  first = first_stage(sweep)
  if not sweep["best_seeds"]:
    return first, True
  if any(status(p) is None for p in first):
    return first, False
  return first + second_stage(sweep, summarize(sweep, first)), True


def run_sweep(sweep: dict, log, limit: int = 0, retry_failed: bool = False) -> dict:
  """Run every point not yet finished (at most `limit` of them when > 0), writing the summary after each."""
  ran = 0
  while True:
    points, complete = all_points(sweep)
    todo = [p for p in points if status(p) is None or (retry_failed and status(p) == "failed")]
    if not todo or (limit and ran >= limit):
      break
    p = todo[0]
    more = "" if complete else " (the best_seeds stage follows)"
    progress.Progress("sweep", len(points), "points", every=0, rate=False)(
        points.index(p) + 1, f"running {p['arm']}/{p['name']}{more}")
    run_point(sweep, p, log)
    ran += 1
    write_summary(sweep, summarize(sweep, all_points(sweep)[0]))
  summary = summarize(sweep, all_points(sweep)[0])
  write_summary(sweep, summary)
  return summary


def slurm_command(sweep_path: str, sweep: dict) -> str:
  n1 = len(first_stage(sweep))
  lines = [f"job=$(sbatch --parsable --array=0-{n1 - 1} launch/slurm_sweep.sbatch --config {sweep_path})"]
  if sweep["best_seeds"]:
    n2 = len(sweep["arms"]) * len(sweep["best_seeds"])
    lines.append(f"sbatch --dependency=afterok:$job --array={n1}-{n1 + n2 - 1} launch/slurm_sweep.sbatch "
                 f"--config {sweep_path}")
  lines.append(f"sbatch --dependency=afterany:$job launch/slurm_sweep.sbatch --config {sweep_path} --summary")
  return "\n".join(lines)


@cli
def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m jaxtele.sweep", description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="sweep recipe: path[:arg] with get_sweep()")
  what = ap.add_mutually_exclusive_group()
  what.add_argument("--list", action="store_true", help="print the points and their state")
  what.add_argument("--point", type=int, help="run only point I (a SLURM array task)")
  what.add_argument("--slurm", action="store_true", help="print the sbatch commands for the whole grid")
  what.add_argument("--summary", action="store_true", help="only rewrite summary.json / summary.md")
  ap.add_argument("--max-points", type=int, default=0, help="stop after this many points (0: all)")
  ap.add_argument("--retry-failed", action="store_true", help="run failed points again")
  args = ap.parse_args(sys.argv[1:] if argv is None else argv)
  log = progress.log
  sweep = load_sweep(args.config)
  if args.slurm:
    print(slurm_command(args.config, sweep))
    return 0
  points, complete = all_points(sweep)
  if args.list:
    for i, p in enumerate(points):
      print(f"{i:4d}  {status(p) or 'todo':7s} {p['arm']}/{p['name']}")
    if not complete:
      print(f"      +{len(sweep['arms']) * len(sweep['best_seeds'])} points (best_seeds) once these are finished")
    return 0
  if args.point is not None:
    if not 0 <= args.point < len(points):
      extra = "" if complete else " (the best_seeds stage is planned once the first stage has finished)"
      raise JaxteleError(f"--point: {args.point} is outside 0..{len(points) - 1}{extra}")
    if status(points[args.point]) != "done":
      run_point(sweep, points[args.point], log)
    return 0
  if args.summary:
    summary = summarize(sweep, points)
  else:
    summary = run_sweep(sweep, log, args.max_points, args.retry_failed)
  write_summary(sweep, summary)
  log(f"sweep: {summary['finished']}/{summary['points']} points finished; summary in "
      f"{os.path.join(sweep['root'], 'summary.md')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
