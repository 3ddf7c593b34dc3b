"""The run comparison's drawings (`jaxtele.run_report`) of gradient norms and of diagnostics.json
(`python -m jaxtele.eval.diagnose`): it reads the file, so the report never imports evaluation.

Gradient norms of different parameter sets are never drawn on one axis as if comparable: each (run, group)
pair gets its own panel, and one shared panel shows them normalised per parameter (norm / sqrt(parameters),
the RMS gradient entry) where diagnostics.json gives the parameter counts. Plots take objects with
`.name`, `.series(key)` and `.diagnostics` (run_report.Run) and return (file name, None) or (None, why).
"""

import os

import numpy as np

from jaxtele.metrics import GRAD_NORM, TRAIN, grad_keys


def figure(rows, cols, width=4.2, height=3.4):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  return plt, fig, axes


def save(plt, fig, out_dir, name):
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, name), dpi=110)
  plt.close(fig)
  return name


def _parameters(run, key):
  return ((run.diagnostics or {}).get("grad_norms", {}).get(key) or {}).get("parameters")


def plot_grad_norms(runs, out_dir):
  keys = {r.name: grad_keys(r.rows) for r in runs}
  have = [r for r in runs if keys[r.name]]
  if not have:
    return None, f"no run logged {GRAD_NORM}*"
  counted = [(r, k) for r in have for k in keys[r.name] if _parameters(r, k)]
  cols = max(len(keys[r.name]) for r in have) + (1 if counted else 0)
  plt, fig, axes = figure(len(have), cols)
  for i, r in enumerate(have):
    for j, k in enumerate(keys[r.name]):
      ax = axes[i][j]
      ax.plot(*r.series(k), marker=".")
      n = _parameters(r, k)
      ax.set(xlabel="step", ylabel="gradient norm",
             title=f"{r.name}: {k.removeprefix(TRAIN)}" + (f"\n({n:,} parameters)" if n else ""))
      ax.grid(alpha=0.3)
    for j in range(len(keys[r.name]), cols):
      axes[i][j].axis("off")
  if counted:
    ax = axes[0][cols - 1]
    ax.axis("on")
    for r, k in counted:
      steps, v = r.series(k)
      ax.plot(steps, np.asarray(v) / np.sqrt(_parameters(r, k)), marker=".", label=f"{r.name}: {k.removeprefix(TRAIN)}")
    ax.set(xlabel="step", ylabel="norm / sqrt(parameters)", title="per parameter (RMS gradient entry)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return save(plt, fig, out_dir, "grad_norms.png"), None


def plot_diagnostics(runs, out_dir):
  """Intruders against eps, the distribution of top similarities, ||dW|| / ||W0|| per module type over the
  checkpoints, and rho per module type (LoRA runs)."""
  have = [r for r in runs if r.diagnostics and r.diagnostics.get("intruders_by_eps")]
  if not have:
    return None, "no run has diagnostics.json with intruders by eps (python -m jaxtele.eval.diagnose RUN_DIR)"
  plt, fig, axes = figure(1, 4, width=4.6, height=4.6)
  ax_eps, ax_sim, ax_ratio, ax_rho = axes[0]
  styles = ["-", "--", ":", "-."]
  for i, r in enumerate(have):
    d = r.diagnostics
    ie = d["intruders_by_eps"]
    ax_eps.plot(ie["eps"], ie["total"], marker="o", label=r.name)
    sims = np.concatenate([np.asarray(row["top_similarity"], float) for row in d["rows"]])
    ax_sim.hist(sims, bins=np.linspace(0, 1, 21), histtype="step", lw=1.5, label=f"{r.name} ({len(sims)})")
    for j, (m, s) in enumerate(d.get("update_ratio", {}).items()):
      ax_ratio.plot(s["steps"], s["values"], styles[i % 4], marker=".", color=f"C{j}", label=f"{r.name}: {m}")
  ax_eps.axvline(have[0].diagnostics.get("eps", 0.5), color="grey", lw=0.8)
  ax_eps.set(xlabel="eps (|cos| threshold)", ylabel="intruder dimensions (all layers)",
             title="Intruders against eps")
  ax_sim.set(xlabel="largest |cos| with a base singular vector", ylabel="top-k singular vectors",
             title="Top similarities")
  ax_ratio.set(xlabel="step (checkpoints)", ylabel="||W - W0|| / ||W0||", title="Update-to-weight ratio")
  lora = [r for r in have if any(s.get("rho_mean") is not None for s in r.diagnostics["summary"].values())]
  modules = list(dict.fromkeys(m for r in lora for m in r.diagnostics["summary"]))
  x, width = np.arange(len(modules)), 0.8 / max(len(lora), 1)
  for i, r in enumerate(lora):
    s = r.diagnostics["summary"]
    ax_rho.bar(x + (i - (len(lora) - 1) / 2) * width, [s.get(m, {}).get("rho_mean", 0) for m in modules], width,
               label=f"{r.name} (all: {r.diagnostics['rho']:.3f})")
  ax_rho.set_xticks(x, modules, rotation=30, ha="right")
  ax_rho.set(ylim=(0, 1), ylabel="rho", title="Gradient energy a LoRA step can reach" if lora else
             "rho: no LoRA run diagnosed")
  for ax in (ax_eps, ax_sim, ax_ratio, ax_rho):
    ax.grid(alpha=0.3)
    if ax is not ax_ratio and ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  if ax_ratio.get_legend_handles_labels()[0]:  # colour: module type, line style: run; below, out of the way
    ax_ratio.legend(fontsize=5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
  return save(plt, fig, out_dir, "diagnostics.png"), None


def rank_table(runs) -> list[str]:
  """Markdown rows: effective rank of dW per module type next to the most an update could have."""
  have = [r for r in runs if r.diagnostics and r.diagnostics.get("summary")]
  lines = []
  if have:
    lines = ["| run | module | effective rank (mean, max) | maximum rank | intruders | rho |",
             "|---|---|---|---|---|---|"]
    for r in have:
      for m, s in r.diagnostics["summary"].items():
        rho = f"{s['rho_mean']:.3f}" if s.get("rho_mean") is not None else "-"
        lines.append(f"| {r.name} | {m} | {s['effective_rank_mean']:.1f}, {s['effective_rank_max']} | "
                     f"{s.get('max_rank', 'n/a')} | {s['intruders_total']} | {rho} |")
  return lines
