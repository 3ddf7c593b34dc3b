"""Domain gain against forgetting: the frontier of a run's checkpoints and the best one within its budget.

With `eval.forgetting_base`, every evaluation logs `forget/domain_bpb` and `forget/general_bpb` (bits per byte,
pooled over the eval sets of each role) beside the frozen base's (`forget/base_*`, step 0). A checkpoint is on
the frontier when no other has both a lower-or-equal domain bpb and a lower-or-equal general bpb (one strictly);
it is within budget when its general bpb is at most (1 + train.forgetting_budget) x the base's. The best within
budget has the lowest domain bpb among those (ties: the lower general bpb, then the earlier step).
Reads only files (metrics.jsonl, checkpoint folders and their JSON meta), through `run.RunDir`.
"""

import json
import os
import re

from jaxtele.errors import JaxteleError
from jaxtele.metrics import STEP, forget_key, read_metrics
from jaxtele.run import FRONTIER, METRICS as METRICS_FILE, RunDir

ROLES = ("domain", "general")
SELECTIONS = ("best-within-budget",)
GENERAL_NAME = re.compile(r"wiki|general|web|english|c4|pile|fineweb", re.IGNORECASE)
SUMMARY = FRONTIER
KEYS = (forget_key("domain_bpb"), forget_key("general_bpb"))
BASE_KEYS = (forget_key("base_domain_bpb"), forget_key("base_general_bpb"))


def role(spec: dict) -> str:
  """An eval set's role: its `role` key, else general when its name says so (wikitext, general...), else domain."""
  return spec.get("role") or ("general" if GENERAL_NAME.search(str(spec.get("name", ""))) else "domain")


def base_of(rows: list[dict]) -> dict | None:
  """The frozen base's pooled bpb, as the run logged it."""
  for r in reversed(rows):
    if all(k in r for k in BASE_KEYS):
      return {"domain_bpb": r[BASE_KEYS[0]], "general_bpb": r[BASE_KEYS[1]]}
  return None


def points(rows: list[dict], budget: float = 0.0) -> list[dict]:
  """One point per evaluated step > 0 (a step logged twice, before a kill and after resume, keeps the last)."""
  base = base_of(rows)
  by_step = {}
  for r in rows:
    if (r.get(STEP) or 0) > 0 and all(k in r for k in KEYS):
      by_step[r[STEP]] = {"step": r[STEP], "domain_bpb": r[KEYS[0]], "general_bpb": r[KEYS[1]]}
  out = [by_step[s] for s in sorted(by_step)]
  for p in out:
    p["over_budget"] = over_budget(p["general_bpb"], base, budget)
    if base:
      p["domain_gain"] = base["domain_bpb"] - p["domain_bpb"]
      p["general_increase"] = p["general_bpb"] / base["general_bpb"] - 1.0
  return out


def over_budget(general_bpb: float, base: dict | None, budget: float) -> bool:
  return bool(base and budget > 0 and general_bpb > base["general_bpb"] * (1.0 + budget))


def pareto(pts: list[dict]) -> list[int]:
  """Steps of the points no other point dominates (lower is better on both axes)."""
  def dominated(p):
    return any(q["domain_bpb"] <= p["domain_bpb"] and q["general_bpb"] <= p["general_bpb"]
               and (q["domain_bpb"] < p["domain_bpb"] or q["general_bpb"] < p["general_bpb"]) for q in pts)

  return [p["step"] for p in pts if not dominated(p)]


def best_within_budget(pts: list[dict]) -> dict | None:
  ok = [p for p in pts if not p["over_budget"]]
  return min(ok, key=lambda p: (p["domain_bpb"], p["general_bpb"], p["step"])) if ok else None


def checkpoint_steps(run_dir: str) -> list[int]:
  return RunDir(run_dir).steps()


def run_budget(run_dir: str) -> float:
  """train.forgetting_budget from the config stored with the run's latest checkpoint (0: none)."""
  cfg = RunDir(run_dir).latest_config()
  return float(cfg.train.forgetting_budget) if cfg is not None else 0.0


def summary(run_dir: str, budget: float | None = None) -> dict:
  """The run's frontier over its checkpoints on disk, and the best one within budget."""
  rows = read_metrics(run_dir)
  budget = run_budget(run_dir) if budget is None else budget
  saved = set(checkpoint_steps(run_dir))
  pts = [p | {"checkpoint": p["step"] in saved} for p in points(rows, budget)]
  on_disk = [p for p in pts if p["checkpoint"]]
  best = best_within_budget(on_disk)
  return {"budget": budget, "base": base_of(rows), "points": pts, "frontier": pareto(on_disk),
          "best_within_budget": best["step"] if best else None}


def write_summary(run_dir: str, budget: float, log=print) -> dict:
  s = summary(run_dir, budget)
  with open(RunDir(run_dir).file(SUMMARY), "w") as f:
    json.dump(s, f, indent=2)
  if s["points"]:
    best = next((p for p in s["points"] if p["step"] == s["best_within_budget"]), None)
    what = (f"step {best['step']} (domain bpb {best['domain_bpb']:.4f}, general bpb {best['general_bpb']:.4f}, "
            f"{best.get('general_increase', 0.0):+.2%} vs the base)") if best else "none"
    log(f"frontier: steps {s['frontier']}; best within budget: {what}; {RunDir(run_dir).file(SUMMARY)}")
  return s


def select_step(run_dir: str, selection: str, step: int | None) -> int:
  """The checkpoint step `selection` names in a run directory."""
  if selection not in SELECTIONS:
    raise JaxteleError(f"--select: unknown {selection!r} (choose from {', '.join(SELECTIONS)})")
  if step is not None:
    raise JaxteleError("--select: give either --select or --step, not both")
  if not RunDir(run_dir).is_run():
    raise JaxteleError(f"--select: {run_dir} is not a run directory")
  s = summary(run_dir)
  if not s["points"]:
    raise JaxteleError(f"--select: {os.path.join(run_dir, METRICS_FILE)} has no forget/* evaluations "
                       "(train with eval.forgetting_base=True)")
  if s["best_within_budget"] is None:
    raise JaxteleError(f"--select: no checkpoint of {run_dir} is within its forgetting budget (+{s['budget']:.1%})")
  return s["best_within_budget"]


# --- The report's section (`python -m jaxtele.run_report`): the frontier over checkpoints and over runs. ---

def report_section(runs, out_dir: str, figure, save) -> list[str]:
  """Markdown lines: a plot of domain bpb against general bpb per checkpoint (each run's frontier joined, its best
  within budget starred, the budget's general-bpb limit dashed) and the frontier over all runs, with a table."""
  found = [(r.name, summary(r.dir)) for r in runs]
  found = [(n, s) for n, s in found if s["points"]]
  if not found:  # runs without eval.forgetting_base: no section
    return []
  pooled = [p | {"run": n} for n, s in found for p in s["points"] if p["checkpoint"]]
  overall = {(p["run"], p["step"]) for p in pooled
             if not any(q["domain_bpb"] <= p["domain_bpb"] and q["general_bpb"] <= p["general_bpb"] and
                        (q["domain_bpb"] < p["domain_bpb"] or q["general_bpb"] < p["general_bpb"]) for q in pooled)}
  best = best_within_budget(pooled)
  plt, fig, (ax,) = figure()
  for name, s in found:
    pts = s["points"]
    line = ax.plot([p["general_bpb"] for p in pts], [p["domain_bpb"] for p in pts], "o", alpha=0.4, label=name)[0]
    front = sorted((p for p in pts if p["step"] in s["frontier"]), key=lambda p: p["general_bpb"])
    ax.plot([p["general_bpb"] for p in front], [p["domain_bpb"] for p in front], "-", color=line.get_color())
    if s["base"]:
      ax.plot(s["base"]["general_bpb"], s["base"]["domain_bpb"], "s", color=line.get_color())
      if s["budget"]:
        ax.axvline(s["base"]["general_bpb"] * (1 + s["budget"]), ls="--", lw=0.8, color=line.get_color())
    b = next((p for p in pts if p["step"] == s["best_within_budget"]), None)
    if b:
      ax.plot(b["general_bpb"], b["domain_bpb"], "*", ms=14, color=line.get_color())
  front = sorted((p for p in pooled if (p["run"], p["step"]) in overall), key=lambda p: p["general_bpb"])
  ax.plot([p["general_bpb"] for p in front], [p["domain_bpb"] for p in front], "k:", lw=1, label="frontier over runs")
  ax.set(xlabel="general bpb (right = forgetting)", ylabel="domain bpb (down = gain)",
         title="Domain gain vs forgetting (squares: base, stars: best within budget)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  png = save(plt, fig, out_dir, "frontier.png")
  fmt = lambda p: f"step {p['step']} ({p['domain_bpb']:.4f}, {p['general_bpb']:.4f})" if p else "none"  # noqa: E731
  rows = ["| run | budget | base (domain, general bpb) | frontier steps | best within budget |", "|---|---|---|---|---|"]
  for name, s in found:
    b = next((p for p in s["points"] if p["step"] == s["best_within_budget"]), None)
    base = f"({s['base']['domain_bpb']:.4f}, {s['base']['general_bpb']:.4f})" if s["base"] else "n/a"
    rows.append(f"| {name} | {'+' + format(s['budget'], '.1%') if s['budget'] else 'none'} | {base} | "
                f"{', '.join(map(str, s['frontier']))} | {fmt(b)} |")
  over_runs = f"{best['run']} {fmt(best)}" if best else "none"
  return [f"![Domain gain vs forgetting]({png})", "", *rows, "",
          f"Over runs: frontier {', '.join(f'{r} step {s}' for r, s in sorted(overall))}; best within budget: "
          f"{over_runs}.", ""]
