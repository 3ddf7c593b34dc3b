"""A sweep's summary: every point's final and per-evaluation metrics, each arm's best grid point (flagged when
it sits on the edge of the grid), seed means with their spread, and paired comparisons (by seed) between the
arms' chosen points. Reads only files (each point's metrics.jsonl and sweep_point.json)."""

import json
import math
import os

from jaxtele.run import SWEEP_POINT, RunDir
from jaxtele.metrics import EVAL, STEP, TOKENS_PER_PARAM, TOKENS_SEEN, read_metrics

POINT_FILE = SWEEP_POINT

# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30; past 30 the normal 1.96 is within 2%.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
  return T975[df - 1] if df <= len(T975) else 1.96


def point_metrics(run_dir: str) -> tuple[dict, list]:
  """(the last value of every eval/ key, one entry per evaluation: step, tokens seen if logged, its metrics).
  A step evaluated twice (before an interruption and after the resume) keeps its last row."""
  by_step = {}
  for r in read_metrics(run_dir):
    evals = {k: v for k, v in r.items() if k.startswith(EVAL)}
    if evals and r.get(STEP) is not None:
      by_step.setdefault(r[STEP], {}).update(evals | {k: r[k] for k in (TOKENS_SEEN, TOKENS_PER_PARAM) if k in r})
  curve = [{"step": s, **m} for s, m in sorted(by_step.items())]
  final = {}
  for entry in curve:
    final |= {k: v for k, v in entry.items() if k.startswith(EVAL)}
  return final, curve


def status(p: dict) -> str | None:
  """How a point ended (`done`, `failed`), or None while it has not."""
  path = RunDir(p["run_dir"]).file(POINT_FILE)
  if not os.path.isfile(path):
    return None
  try:
    return json.load(open(path)).get("status")
  except (OSError, json.JSONDecodeError):
    return None  # a torn marker: run the point again (the trainer resumes it)


def _key(combo: dict) -> str:
  return json.dumps(combo, sort_keys=True)


def seed_stats(values: list[float]) -> dict:
  n = len(values)
  mean = sum(values) / n if n else None
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return {"n": n, "mean": mean, "sd": sd}


def paired(a: dict, b: dict) -> dict:
  """a - b over the seeds both have: mean, sd and a 95% t interval (paired by seed: same data order)."""
  seeds = sorted(set(a) & set(b))
  d = [a[s] - b[s] for s in seeds]
  out = {"seeds": seeds, **seed_stats(d)}
  if len(d) < 2:
    out |= {"ci95": None, "verdict": f"{len(d)} paired seed(s): no interval"}
    return out
  half = t975(len(d) - 1) * out["sd"] / math.sqrt(len(d))
  out["ci95"] = [out["mean"] - half, out["mean"] + half]
  out["verdict"] = "not distinguishable at 95%" if out["ci95"][0] <= 0 <= out["ci95"][1] else \
      ("a lower" if out["mean"] < 0 else "a higher")
  return out


def edges(sweep: dict, combo: dict, arm: str | None = None) -> list[str]:
  """Grid keys whose chosen value is the smallest or largest of more than one numeric value (the arm's grid)."""
  out = []
  grid = sweep.get("grids", {}).get(arm, sweep["grid"])
  for key, values in grid.items():
    if len(values) > 1 and all(isinstance(v, (int, float)) for v in values) and combo[key] in (min(values), max(values)):
      out.append(key)
  return out


def summarize(sweep: dict, points: list[dict]) -> dict:
  metric, sign = sweep["select"]["metric"], 1 if sweep["select"].get("mode", "min") == "min" else -1
  first_seeds = set(sweep["seeds"])
  rows = []
  for p in points:
    final, curve = point_metrics(p["run_dir"])
    rows.append({"arm": p["arm"], "name": p["name"], "combo": p["combo"], "seed": p["seed"], "status": status(p),
                 "metric": final.get(metric), "final": final, "curve": curve})
  arms = {}
  for arm in sweep["arms"]:
    groups = {}
    for r in rows:
      if r["arm"] == arm:
        g = groups.setdefault(_key(r["combo"]), {"combo": r["combo"], "by_seed": {}, "failed": []})
        if r["metric"] is not None and r["status"] == "done":
          g["by_seed"][r["seed"]] = r["metric"]
        elif r["status"] == "failed":
          g["failed"].append(r["seed"])
    for g in groups.values():
      g.update(seed_stats(list(g["by_seed"].values())))
      first = [v for s, v in g["by_seed"].items() if s in first_seeds]
      # The choice uses the first stage's seeds only, so the extra seeds never move it; a failed seed disqualifies.
      g["score"] = sum(first) / len(first) if first and not g["failed"] else None
    scored = [g for g in groups.values() if g["score"] is not None]
    best = min(scored, key=lambda g: sign * g["score"]) if scored else None
    arms[arm] = {"grid": list(groups.values()), "best": best, "edge": edges(sweep, best["combo"], arm) if best else []}
  comparisons = []
  for a, b in sweep["compare"]:
    ba, bb = arms[a]["best"], arms[b]["best"]
    if ba and bb:
      comparisons.append({"a": a, "b": b, "metric": metric, **paired(ba["by_seed"], bb["by_seed"])})
  finished = sum(r["status"] in ("done", "failed") for r in rows)
  return {"metric": metric, "mode": sweep["select"].get("mode", "min"), "points": len(rows), "finished": finished,
          "arms": arms, "comparisons": comparisons, "runs": rows}


def _num(v, fmt="{:.4f}") -> str:
  return "-" if v is None else fmt.format(v)


def markdown(summary: dict) -> str:
  m = summary["metric"]
  lines = ["# Sweep summary", "", f"{summary['finished']} of {summary['points']} points finished. Chosen by "
           f"`{m}` ({summary['mode']}) at the final evaluation, averaged over the first-stage seeds.", "",
           "## Grid", "", "| arm | point | seeds | mean | sd | failed seeds | |", "|---|---|---:|---:|---:|---|---|"]
  for arm, a in summary["arms"].items():
    for g in a["grid"]:
      edge = f" (on the grid's edge: {', '.join(a['edge'])})" if a["edge"] else ""
      flag = "**best**" + edge if g is a["best"] else ""
      point = ", ".join(f"{k}={v}" for k, v in g["combo"].items()) or "-"
      lines.append(f"| {arm} | {point} | {g['n']} | {_num(g['mean'])} | {_num(g['sd'])} | "
                   f"{', '.join(map(str, g['failed'])) or '-'} | {flag} |")
  lines += ["", "## Paired comparisons of the chosen points (a - b, paired by seed)", "",
            "| a | b | seeds | mean difference | 95% CI | reading |", "|---|---|---:|---:|---|---|"]
  for c in summary["comparisons"]:
    ci = f"[{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" if c["ci95"] else "-"
    lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {_num(c['mean'])} | {ci} | {c['verdict']} |")
  keys = sorted({k for r in summary["runs"] for k in r["final"]})
  lines += ["", "## Every point at its final evaluation", "",
            "| arm | point | status | " + " | ".join(f"`{k}`" for k in keys) + " |",
            "|---|---|---|" + "---:|" * len(keys)]
  for r in summary["runs"]:
    lines.append(f"| {r['arm']} | {r['name']} | {r['status'] or 'todo'} | " +
                 " | ".join(_num(r["final"].get(k)) for k in keys) + " |")
  lines += ["", "Per-evaluation values (step, tokens seen where logged) of every point are in summary.json "
            "(`runs[].curve`)."]
  return "\n".join(lines) + "\n"


def write_summary(sweep: dict, summary: dict):
  os.makedirs(sweep["root"], exist_ok=True)
  for name, text in (("summary.json", json.dumps(summary, indent=1, default=str)), ("summary.md", markdown(summary))):
    tmp = os.path.join(sweep["root"], name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(sweep["root"], name))
