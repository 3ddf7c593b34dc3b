"""`python -m jaxtele.run_report RUN_DIR [RUN_DIR ...] [--out DIR] [--domain RE] [--general RE] [--x tokens_seen]`

One Markdown page (DIR/report.md, PNG plots beside it, linked relatively) comparing runs side by side (one
evaluation's own results page is `jaxtele.eval.results_page`):
the runs' key settings, final metrics, loss curves, eval perplexities over steps (or `--x tokens_seen`,
`tokens_per_param`), domain gain vs general loss, gradient norms per group, and intruder dimensions from
RUN_DIR/diagnostics.json (`python -m jaxtele.eval.diagnose`). What a plot needs and no run has is noted on the page, not fatal.
Reads only files (metrics.jsonl, the latest checkpoint's JSON meta, diagnostics.json), through `run.RunDir`.
A run that has logged no metrics is an error: there is nothing to compare.
"""

import argparse
import os
import re
import sys

from jaxtele import run_report_plots
from jaxtele.errors import JaxteleError, cli
from jaxtele.metrics import (STEP, TOKENS_PER_PARAM, TOKENS_SEEN, TRAIN_LOSS, eval_key, eval_set_of,
                             read_metrics)
from jaxtele.run import DIAGNOSTICS, RunDir, read_json

DOMAIN_RE, GENERAL_RE = r"3gpp|telecom", r"wikitext"
X_AXES = {STEP: "steps", TOKENS_SEEN: "tokens seen", TOKENS_PER_PARAM: "tokens per parameter"}


class Run:
  """What the report needs from one run directory."""

  def __init__(self, run_dir: str, name: str):
    if not os.path.isdir(run_dir):
      raise JaxteleError(f"{run_dir}: no such run directory")
    self.dir, self.name = run_dir, name
    run = RunDir(run_dir)
    self.rows = read_metrics(run_dir)
    if not self.rows:
      raise JaxteleError(f"{run.metrics}: {'empty' if os.path.isfile(run.metrics) else 'missing'} "
                         "(the run has logged no metrics yet: nothing to report)")
    self.config = run.latest_config()  # None without a checkpoint
    diag = run.file(DIAGNOSTICS)
    self.diagnostics = read_json(diag, "diagnostics") if os.path.isfile(diag) else None

  def series(self, key: str, x: str = STEP) -> tuple[list, list]:
    """(x values, values) of `key` over the rows that have both (x: step, tokens_seen or tokens_per_param)."""
    pts = [(r[x], r[key]) for r in self.rows if key in r and r.get(x) is not None]
    return ([s for s, _ in pts], [v for _, v in pts]) if pts else ([], [])

  def last(self, key: str):
    _, values = self.series(key)
    return values[-1] if values else None

  def eval_sets(self) -> list[str]:
    return sorted({s for r in self.rows for k in r if (s := eval_set_of(k, "ppl"))})


def settings(run: Run) -> dict:
  c = run.config
  if c is None:  # no checkpoint to read the config from
    return {"mode": None, "lora rank": None, "lr": None, "steps": None, "batch x seq": None, "token slots": None,
            "model": None}
  mode, steps, batch, seq = c.train.mode, c.train.steps, c.data.batch_size, c.data.seq_len
  return {"mode": mode, "lora rank": c.lora.rank if mode == "lora" else "-", "lr": f"{c.optimizer.lr:.2e}",
          "steps": steps, "batch x seq": f"{batch} x {seq}", "token slots": f"{steps * batch * seq:,}",
          "model": c.model.source or "random init"}


def md_table(header: list, rows: list[list]) -> str:
  fmt = lambda v: "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def final_metrics(runs: list[Run]) -> str:
  sets = sorted({s for r in runs for s in r.eval_sets()})
  header = ["run", "step", TRAIN_LOSS] + [f"{s} ppl (first -> last)" for s in sets]
  rows = []
  for r in runs:
    steps, _ = r.series(TRAIN_LOSS)
    cells = [r.name, steps[-1] if steps else None, r.last(TRAIN_LOSS)]
    for s in sets:
      _, v = r.series(eval_key(s, "ppl"))
      cells.append(f"{v[0]:.3f} -> {v[-1]:.3f}" if v else None)
    rows.append(cells)
  return md_table(header, rows)


# --- plots: each returns a file name, or None with the reason ---

def _figure(ncols=1, width=6.4):
  plt, fig, axes = run_report_plots.figure(1, ncols, width, 4.2)
  return plt, fig, axes[0]


def plot_loss(runs, out_dir):
  have = [r for r in runs if r.series(TRAIN_LOSS)[0]]
  if not have:
    return None, f"no run logged {TRAIN_LOSS}"
  plt, fig, (ax,) = _figure()
  for r in have:
    ax.plot(*r.series(TRAIN_LOSS), marker=".", label=r.name)
  ax.set(xlabel="step", ylabel=TRAIN_LOSS, title="Training loss")
  ax.grid(alpha=0.3)
  ax.legend()
  return run_report_plots.save(plt, fig, out_dir, "loss.png"), None


def plot_eval(runs, out_dir, x=STEP):
  sets = sorted({s for r in runs for s in r.eval_sets()})
  if not sets:
    return None, "no run logged eval/*/ppl"
  if not any(r.series(eval_key(s, "ppl"), x)[0] for r in runs for s in sets):
    return None, f"no run keyed its evaluations by {x}"
  plt, fig, axes = _figure(len(sets), width=5.0)
  for ax, s in zip(axes, sets):
    for r in runs:
      steps, v = r.series(eval_key(s, "ppl"), x)
      if steps:
        ax.plot(steps, v, marker="o", label=r.name)
    if x != STEP:
      ax.set_xscale("symlog", linthresh=min((p for r in runs for p in r.series(eval_key(s, "ppl"), x)[0] if p > 0),
                                            default=1))
    ax.set(xlabel=x.replace("_", " "), ylabel="perplexity", title=eval_key(s, "ppl"))
    ax.grid(alpha=0.3)
    ax.legend()
  return run_report_plots.save(plt, fig, out_dir, "eval_ppl.png"), None


def pick_set(sets: list[str], pattern: str) -> str | None:
  return next((s for s in sets if re.search(pattern, s, re.IGNORECASE)), None)


def plot_tradeoff(runs, out_dir, domain_re, general_re):
  plt, fig, (ax,) = None, None, (None,)
  drawn = 0
  for r in runs:
    d, g = pick_set(r.eval_sets(), domain_re), pick_set(r.eval_sets(), general_re)
    if not (d and g):
      continue
    ds, dv = r.series(eval_key(d, "ppl"))
    gv = dict(zip(*r.series(eval_key(g, "ppl"))))
    pts = [(s, gv[s] - next(iter(gv.values())), v - dv[0]) for s, v in zip(ds, dv) if s in gv]
    if len(pts) < 2:
      continue
    if fig is None:
      plt, fig, (ax,) = _figure()
    ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=f"{r.name} ({d} vs {g})")
    ax.annotate(f"step {pts[-1][0]}", (pts[-1][1], pts[-1][2]), textcoords="offset points", xytext=(5, 5),
                fontsize=8)
    drawn += 1
  if not drawn:
    return None, (f"no run has at least two evaluations of both a domain set (/{domain_re}/) and a general set "
                  f"(/{general_re}/)")
  ax.axhline(0, color="grey", lw=0.8)
  ax.axvline(0, color="grey", lw=0.8)
  ax.set(xlabel="change in general perplexity since first eval (right = forgetting)",
         ylabel="change in domain perplexity (down = gain)", title="Domain gain vs general loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return run_report_plots.save(plt, fig, out_dir, "domain_vs_general.png"), None


def plot_grad_norms(runs, out_dir):
  """One panel per (run, gradient group), and one per parameter: norms over different sets never share an axis."""
  return run_report_plots.plot_grad_norms(runs, out_dir)


def plot_intruders(runs, out_dir):
  have = [r for r in runs if r.diagnostics and r.diagnostics.get("summary")]
  if not have:
    return None, "no run has diagnostics.json (python -m jaxtele.eval.diagnose RUN_DIR)"
  import numpy as np

  modules = list(dict.fromkeys(m for r in have for m in r.diagnostics["summary"]))
  plt, fig, axes = _figure(2, width=5.5)
  width = 0.8 / len(have)
  x = np.arange(len(modules))
  for ax, key, title in ((axes[0], "intruders_total", "Intruder dimensions (sum over layers)"),
                         (axes[1], "effective_rank_mean", "Effective rank of dW (mean over layers)")):
    for i, r in enumerate(have):
      s = r.diagnostics["summary"]
      ax.bar(x + (i - (len(have) - 1) / 2) * width, [s.get(m, {}).get(key, 0) for m in modules], width,
             label=r.name)
    ax.set_xticks(x, modules, rotation=30, ha="right")
    ax.set(title=title, ylabel=key.replace("_", " "))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
  return run_report_plots.save(plt, fig, out_dir, "intruders.png"), None


def run_names(dirs: list[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(d)) for d in dirs]
  if len(set(names)) < len(names):  # same folder name under different parents
    names = [os.path.relpath(os.path.abspath(d), os.path.commonpath([os.path.abspath(x) for x in dirs]))
             for d in dirs]
  return names


def build_report(run_dirs: list[str], out_dir: str, domain_re: str = DOMAIN_RE, general_re: str = GENERAL_RE,
                 x: str = STEP) -> str:
  """Write out_dir/report.md and its PNGs; returns the report's path."""
  if not run_dirs:
    raise JaxteleError("report: give at least one RUN_DIR")
  runs = [Run(d, n) for d, n in zip(run_dirs, run_names(run_dirs))]
  os.makedirs(out_dir, exist_ok=True)
  s = [settings(r) for r in runs]
  page = ["# Run comparison", "", "## Runs", "",
          md_table(["run", "path"] + list(s[0]), [[r.name, r.dir] + list(x.values()) for r, x in zip(runs, s)]),
          "", "## Final metrics", "", final_metrics(runs), ""]
  plots = [("Loss curves", plot_loss(runs, out_dir)),
           (f"Eval perplexity over {X_AXES[x]}", plot_eval(runs, out_dir, x)),
           ("Domain gain vs general loss", plot_tradeoff(runs, out_dir, domain_re, general_re)),
           ("Gradient norms", plot_grad_norms(runs, out_dir)), ("Intruder dimensions", plot_intruders(runs, out_dir)),
           ("Intruders by eps, similarities, update ratios, reach", run_report_plots.plot_diagnostics(runs, out_dir))]
  for title, (png, why) in plots:
    page += [f"## {title}", "", f"![{title}]({png})" if png else f"_Skipped: {why}._", ""]
  ranks = run_report_plots.rank_table(runs)
  if ranks:
    page += ["Effective rank of dW next to the most an update of that module could have:", ""] + ranks + [""]
  from jaxtele.frontier import report_section

  frontier = report_section(runs, out_dir, _figure, run_report_plots.save)  # only for runs with eval.forgetting_base
  page += ["## Gain against forgetting: the frontier", "", *frontier] if frontier else []
  intruders = [(r.name, r.diagnostics["intruders_total"]) for r in runs if r.diagnostics]
  if intruders:
    page += ["Total intruder dimensions: " + ", ".join(f"{n} {t}" for n, t in intruders), ""]
  page += [f"_Domain set: first eval set matching /{domain_re}/; general set: first matching /{general_re}/._", ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(page))
  return path


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.run_report", description="Compare runs on one Markdown page.")
  p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  p.add_argument("--out", default="report", help="output folder (default ./report)")
  p.add_argument("--domain", default=DOMAIN_RE, help=f"regex naming the domain eval set (default {DOMAIN_RE})")
  p.add_argument("--general", default=GENERAL_RE, help=f"regex naming the general eval set (default {GENERAL_RE})")
  p.add_argument("--x", default=STEP, choices=list(X_AXES), help="x-axis of the eval curves (default step)")
  a = p.parse_args(argv)
  for pattern, flag in ((a.domain, "--domain"), (a.general, "--general")):
    try:
      re.compile(pattern)
    except re.error as e:
      raise JaxteleError(f"{flag}: bad regex {pattern!r} ({e})") from None
  print(build_report(a.run_dirs, a.out, a.domain, a.general, a.x))
  return 0


if __name__ == "__main__":
  sys.exit(main())
