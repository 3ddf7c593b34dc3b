"""The drawings of `python -m jaxtele.eval.saturation report`: curves over tokens seen, the gap G(D) with its
intervals, the learn/forget frontier over every evaluated point, and intruders against eps over D."""

import os

import numpy as np


def _figure(cols=1, width=5.0, height=3.8):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, cols, figsize=(width * cols, height), squeeze=False)
  return plt, fig, axes[0]


def _save(plt, fig, out, name):
  from matplotlib.ticker import NullFormatter

  for ax in fig.axes:
    if ax.get_xscale() == "log":
      ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap at these spans
  fig.tight_layout()
  fig.savefig(os.path.join(out, name), dpi=110)
  plt.close(fig)


def plot_curves(res, out):
  names = list(res["curves_all_sets"])
  plt, fig, axes = _figure(len(names), width=4.2)
  for ax, name in zip(axes, names):
    for arm, c in res["curves_all_sets"][name].items():
      t = np.asarray(c["tokens"], float)
      v = np.asarray(list(c["by_seed"].values()))
      keep = t > 0
      m, sd = v.mean(0)[keep], (v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1]))[keep]
      ax.plot(t[keep], m, marker="o", ms=3, label=f"{arm} ({len(v)} seeds)")
      ax.fill_between(t[keep], m - sd, m + sd, alpha=0.2)
    ax.set_xscale("log")
    ax.set_title(name)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("bits per byte")
  axes[0].legend(fontsize=7)
  _save(plt, fig, out, "curves.png")


def plot_gap(res, out):
  plt, fig, (ax,) = _figure()
  for arm, g in res["gap"].items():
    pts = [x for x in g if x["tokens"] > 0]
    t = np.asarray([x["tokens"] for x in pts], float)
    m = np.asarray([x["mean"] for x in pts])
    lo = np.asarray([x["ci95"][0] if x["ci95"] else x["mean"] for x in pts])
    hi = np.asarray([x["ci95"][1] if x["ci95"] else x["mean"] for x in pts])
    ax.errorbar(t, m, yerr=[m - lo, hi - m], marker="o", ms=3, capsize=3, label=arm)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("tokens seen")
  ax.set_ylabel(f"G(D) = bpb - bpb_{res['ref']} ({res['primary']})")
  ax.set_title("gap to full FT, 95% t-CI over seeds")
  ax.legend(fontsize=7)
  _save(plt, fig, out, "gap.png")


def plot_frontier(res, points, out):
  plt, fig, (ax,) = _figure(width=5.6, height=4.4)
  arms = sorted({p["arm"] for p in points})
  for arm in arms:
    ps = [p for p in points if p["arm"] == arm and p["tokens"] > 0]
    ax.scatter([p["domain_bpb"] for p in ps], [p["source_bpb"] for p in ps], s=10, alpha=0.6, label=arm)
  base = [p for p in points if p["tokens"] == 0]
  if base:
    ax.scatter([base[0]["domain_bpb"]], [base[0]["source_bpb"]], marker="*", s=120, c="k", label="base")
  xs = np.asarray([p["domain_bpb"] for p in points])
  ys = np.asarray([p["source_bpb"] for p in points])
  hx, hy = np.quantile(xs, 0.95), np.quantile(ys, 0.95)  # a diverged rate's points would stretch the axes
  clipped = int(((xs > hx) | (ys > hy)).sum())
  ax.set_xlim(xs.min() - 0.02, hx + 0.02)
  ax.set_ylim(ys.min() - 0.02, hy + 0.02)
  ax.text(0.99, 0.01, f"{clipped} points beyond the 95th percentile not shown", transform=ax.transAxes,
          ha="right", va="bottom", fontsize=7)
  ax.set_xlabel(f"{res['primary']} bpb (learning: lower is better)")
  ax.set_ylabel("source held-out bpb (forgetting: lower is better)")
  ax.set_title("every evaluated point: arm x lr x seed x D")
  ax.legend(fontsize=7)
  _save(plt, fig, out, "frontier.png")


def plot_intruders(res, out):
  intr = res.get("intruders") or {}
  if not intr:
    return
  plt, fig, axes = _figure(len(intr), width=3.4)
  for ax, (arm, by_step) in zip(axes, intr.items()):
    for step, v in by_step.items():
      ax.plot(v["eps"], v["total"], marker="o", ms=3, label=f"step {step}")
    ax.set_title(arm)
    ax.set_xlabel("eps")
    ax.set_ylabel("intruders (all layers, seed mean)")
    ax.legend(fontsize=7)
  _save(plt, fig, out, "intruders.png")


def write_all(res, points, out):
  plot_curves(res, out)
  plot_gap(res, out)
  plot_frontier(res, points, out)
  plot_intruders(res, out)
