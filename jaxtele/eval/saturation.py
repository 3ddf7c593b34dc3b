"""Reading a LoRA-vs-full sweep for saturation (docs/experiments/lora_saturation_analog.md).

  python -m jaxtele.eval.saturation post --sweep ROOT       # diagnose every checkpoint + the lambda test, chosen points
  python -m jaxtele.eval.saturation report --sweep ROOT --out DIR [--data DATA] [--ref full] [--lora lora_r1] ...

`report` reads ROOT/summary.json (python -m jaxtele.sweep) and what `post` wrote, and writes DIR/results.json,
DIR/results.md and the plots: each arm's chosen point over tokens seen (seed mean and spread), the gap
G(D) = bpb_arm(D) - bpb_ref(D) on the primary set paired by seed with 95% t-intervals, the improvement per
doubling, the pre-registered conditions, rho and intruders over D, the lambda test, and the learn/forget frontier
over every evaluated point. bpb is loss / ln 2: exact for a byte tokenizer up to the scored end-of-document tokens.
"""

import argparse
import glob
import json
import math
import os
import sys

import numpy as np

from jaxtele.errors import JaxteleError, cli
from jaxtele.sweep_summary import t975

LN2 = math.log(2)


def mean_ci(values) -> dict:
  """Mean, sd (ddof 1) and the 95% t-interval of a list (None where n < 2)."""
  v = np.asarray(values, np.float64)
  n = len(v)
  mean = float(v.mean()) if n else None
  sd = float(v.std(ddof=1)) if n > 1 else None
  half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else None
  return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half] if half is not None else None}


def excludes_zero(stat: dict) -> bool:
  return stat["ci95"] is not None and (stat["ci95"][0] > 0 or stat["ci95"][1] < 0)


def chosen_curves(summary: dict, metric_set: str) -> dict:
  """{arm: {"combo", "tokens": [D...], "by_seed": {seed: [bpb at each D]}}} of each arm's chosen point; D are the
  evaluated token counts every seed has (step 0, the base, included)."""
  out = {}
  for arm, a in summary["arms"].items():
    if not a.get("best"):
      continue
    runs = [r for r in summary["runs"] if r["arm"] == arm and r["combo"] == a["best"]["combo"]
            and r["status"] == "done"]
    series = {r["seed"]: {e.get("tokens_seen", 0): e[f"eval/{metric_set}/loss"] / LN2 for e in r["curve"]
                          if f"eval/{metric_set}/loss" in e} for r in runs}
    if not series:
      continue
    tokens = sorted(set.intersection(*(set(s) for s in series.values())))
    out[arm] = {"combo": a["best"]["combo"], "tokens": tokens,
                "by_seed": {seed: [s[t] for t in tokens] for seed, s in sorted(series.items())}}
  return out


def gaps(curves: dict, ref: str) -> dict:
  """{arm: [{tokens, G stats}]}: bpb_arm - bpb_ref at each D, paired over the seeds both have."""
  out = {}
  for arm, c in curves.items():
    if arm == ref:
      continue
    r = curves[ref]
    seeds = sorted(set(c["by_seed"]) & set(r["by_seed"]))
    tokens = [t for t in c["tokens"] if t in r["tokens"]]
    out[arm] = [{"tokens": t, "seeds": seeds, **mean_ci([c["by_seed"][s][c["tokens"].index(t)] -
                                                         r["by_seed"][s][r["tokens"].index(t)] for s in seeds])}
                for t in tokens]
  return out


def per_doubling(curve: dict) -> list[dict]:
  """Seed-mean improvement bpb(D_{k-1}) - bpb(D_k) between consecutive evaluated D > 0."""
  t = curve["tokens"]
  m = np.mean([v for v in curve["by_seed"].values()], axis=0)
  idx = [i for i, x in enumerate(t) if x > 0]
  return [{"from": t[a], "to": t[b], "gain": float(m[a] - m[b])} for a, b in zip(idx, idx[1:])]


def conditions(curves: dict, gap: dict, rho: dict, lora: str, ref: str, ranks: list[str], candidates: list[str],
               last: int = 3) -> dict:
  """The pre-registered conditions of the page, evaluated (each a bool with the numbers it was read from)."""
  g = [x for x in gap[lora] if x["tokens"] > 0]
  tail = g[-(last + 1):]  # D_{K-3} .. D_K
  grows = all(a["mean"] < b["mean"] for a, b in zip(tail, tail[1:]))
  seeds = tail[0]["seeds"]
  ci = lambda arm, t: [curves[arm]["by_seed"][s][curves[arm]["tokens"].index(t)] for s in seeds]  # noqa: E731
  growth = mean_ci([(a - b) - (c - d) for a, b, c, d in zip(ci(lora, tail[-1]["tokens"]), ci(ref, tail[-1]["tokens"]),
                                                              ci(lora, tail[0]["tokens"]), ci(ref, tail[0]["tokens"]))])
  c1 = grows and excludes_zero(growth) and growth["mean"] > 0 and excludes_zero(tail[-1]) and tail[-1]["mean"] > 0
  gain = lambda arm: float(np.mean([d["gain"] for d in per_doubling(curves[arm])[-last:]]))  # noqa: E731
  c2 = gain(lora) < 0.25 * gain(ref)
  final = {arm: gap[arm][-1]["mean"] for arm in ranks if arm in gap}
  vals = [final[a] for a in ranks if a in final]
  c3 = len(vals) == len(ranks) and all(a > b for a, b in zip(vals, vals[1:])) and vals[-1] < 0.5 * vals[0]
  rho_l = rho.get(lora, {})
  steps = sorted(rho_l)
  c4 = len(steps) >= 2 and rho_l[steps[-1]]["mean"] < rho_l[steps[0]]["mean"]
  refuted, rows = True, []
  for i, t in enumerate(curves[ref]["tokens"]):
    if t == 0:
      continue
    best = min((a for a in candidates if t in curves[a]["tokens"]),
               key=lambda a: np.mean([v[curves[a]["tokens"].index(t)] for v in curves[a]["by_seed"].values()]))
    vb = [v[curves[best]["tokens"].index(t)] for v in curves[best]["by_seed"].values()]
    vr = [v[i] for v in curves[ref]["by_seed"].values()]
    tol = 2 * max(np.std(vb, ddof=1), np.std(vr, ddof=1))
    within = abs(np.mean(vb) - np.mean(vr)) <= tol
    refuted &= bool(within)
    rows.append({"tokens": t, "best": best, "diff": float(np.mean(vb) - np.mean(vr)), "tol": float(tol),
                 "within": bool(within)})
  supported = c1 and c2 and c3 and c4
  return {"1_gap_grows": {"holds": bool(c1), "last_means": [x["mean"] for x in tail], "growth": growth,
                          "final": tail[-1]},
          "2_gain_ratio": {"holds": bool(c2), "lora": gain(lora), "ref": gain(ref),
                           "ratio": gain(lora) / gain(ref) if gain(ref) else None},
          "3_rank": {"holds": bool(c3), "final_gap": final},
          "4_rho_falls": {"holds": bool(c4), "rho": {str(s): rho_l[s] for s in steps}},
          "refuted_check": {"holds": bool(refuted), "rows": rows},
          "reading": "saturates: supported" if supported else ("refuted at this scale" if refuted else "neither")}


def run_dirs(root: str, summary: dict, arm: str) -> list[str]:
  best = summary["arms"][arm].get("best")
  return [os.path.join(root, arm, r["name"]) for r in summary["runs"]
          if best and r["arm"] == arm and r["combo"] == best["combo"] and r["status"] == "done"]


def post(root: str, log=print, lambdas=(1.0, 0.5, 0.0)):
  """diagnostics_step{S}.json at every checkpoint and intruder_scale.json at the last, for each chosen point."""
  from jaxtele.checkpoint import Checkpointer
  from jaxtele.eval.diagnose import diagnose
  from jaxtele.eval.intruder_scale import lambda_test

  summary = read_summary(root)
  for arm in summary["arms"]:
    for d in run_dirs(root, summary, arm):
      with Checkpointer(d, keep=1, async_save=False) as ckpt:
        steps = sorted(ckpt.manager.all_steps())
      # D/4, D/2 and D (the checkpoints the page reads); others are skipped
      steps = [s for s in steps if steps[-1] % s == 0 and steps[-1] // s in (1, 2, 4)]
      for s in steps:
        out = os.path.join(d, f"diagnostics_step{s}.json")
        if not os.path.isfile(out):
          res = diagnose(d, step=s)
          json.dump({k: v for k, v in res.items() if k != "rows"} | {"step": s}, open(out, "w"), indent=1)
          log(f"{d} step {s}: intruders {res['intruders_total']}, rho {res['rho']}")
      out = os.path.join(d, "intruder_scale.json")
      if not os.path.isfile(out):
        json.dump(lambda_test(d, lambdas), open(out, "w"), indent=1)
        log(f"{d}: lambda test written")


def read_summary(root: str) -> dict:
  path = os.path.join(root, "summary.json")
  if not os.path.isfile(path):
    raise JaxteleError(f"--sweep: no {path} (run python -m jaxtele.sweep first)")
  return json.load(open(path))


def diagnostics(root: str, summary: dict) -> tuple[dict, dict, dict]:
  """({arm: {step: rho stats}}, {arm: {step: {eps, total mean}}}, {arm: lambda rows with paired deltas})."""
  rho, intr, lam = {}, {}, {}
  for arm in summary["arms"]:
    per_step = {}
    dirs = run_dirs(root, summary, arm)
    for d in dirs:
      for f in glob.glob(os.path.join(d, "diagnostics_step*.json")):
        r = json.load(open(f))
        per_step.setdefault(r["step"], []).append(r)
    if per_step:
      intr[arm] = {s: {"eps": rs[0]["intruders_by_eps"]["eps"],
                       "total": np.mean([r["intruders_by_eps"]["total"] for r in rs], axis=0).tolist()}
                   for s, rs in sorted(per_step.items())}
      if all(r["rho"] is not None for rs in per_step.values() for r in rs):
        rho[arm] = {s: mean_ci([r["rho"] for r in rs]) for s, rs in sorted(per_step.items())}
    tests = [json.load(open(os.path.join(d, "intruder_scale.json"))) for d in dirs
             if os.path.isfile(os.path.join(d, "intruder_scale.json"))]
    if tests:
      names = list(tests[0]["rows"][0]["sets"])
      rows = []
      for i, row in enumerate(tests[0]["rows"]):
        rows.append({"lambda": row["lambda"], "sets": {n: {
            "bpb": mean_ci([t["rows"][i]["sets"][n]["loss"] / LN2 for t in tests]),
            "delta_vs_1": mean_ci([(t["rows"][i]["sets"][n]["loss"] - t["rows"][0]["sets"][n]["loss"]) / LN2
                                   for t in tests])} for n in names}})
      lam[arm] = {"intruders": mean_ci([t["intruders_total"] for t in tests]), "rows": rows}
  return rho, intr, lam


def frontier(summary: dict, domain: str, source: str) -> list[dict]:
  """Every evaluated point of every run: (arm, lr point, seed, tokens, domain bpb, source bpb)."""
  out = []
  for r in summary["runs"]:
    for e in r["curve"]:
      if f"eval/{domain}/loss" in e and f"eval/{source}/loss" in e:
        out.append({"arm": r["arm"], "name": r["name"], "seed": r["seed"], "tokens": e.get("tokens_seen", 0),
                    "domain_bpb": e[f"eval/{domain}/loss"] / LN2, "source_bpb": e[f"eval/{source}/loss"] / LN2})
  return out


def frontier_reading(points: list[dict], curves_d: dict, curves_s: dict, ref: str) -> dict:
  """Each arm's chosen final point (seed means) against the ref's envelope: the lowest source bpb among the ref's
  points (any rate, seed, D > 0) whose domain bpb is at most the arm's; tolerance 2 sd of the ref's final source
  bpb over seeds."""
  ref_pts = [p for p in points if p["arm"] == ref and p["tokens"] > 0]
  tol = 2 * float(np.std([v[-1] for v in curves_s[ref]["by_seed"].values()], ddof=1))
  out = {}
  for arm in curves_d:
    d = float(np.mean([v[-1] for v in curves_d[arm]["by_seed"].values()]))
    s = float(np.mean([v[-1] for v in curves_s[arm]["by_seed"].values()]))
    env = [p["source_bpb"] for p in ref_pts if p["domain_bpb"] <= d]
    if not env:
      out[arm] = {"domain_bpb": d, "source_bpb": s, "envelope": None, "reading": "learns more than any ref point"}
      continue
    e = min(env)
    verdict = "same trade-off" if abs(s - e) <= tol else ("better trade-off" if s < e else "worse trade-off")
    out[arm] = {"domain_bpb": d, "source_bpb": s, "envelope": e, "excess": s - e, "tol": tol, "reading": verdict}
  return out


def unigram_bpb(train_jsonl: str, eval_jsonl: str) -> float:
  """Cross-entropy (bits per byte) on the eval file's text of a byte-unigram model fitted (add-one) on train."""
  counts = np.ones(256)
  for line in open(train_jsonl):
    counts += np.bincount(np.frombuffer(json.loads(line)["text"].encode(), np.uint8), minlength=256)
  logp = np.log2(counts / counts.sum())
  ev = np.concatenate([np.frombuffer(json.loads(x)["text"].encode(), np.uint8) for x in open(eval_jsonl)])
  return float(-logp[ev].mean())


def _fmt(stat: dict) -> str:
  ci = f" [{stat['ci95'][0]:+.4f}, {stat['ci95'][1]:+.4f}]" if stat.get("ci95") else ""
  return f"{stat['mean']:+.4f}{ci}"


def markdown(res: dict) -> str:
  primary, ref = res["primary"], res["ref"]
  lines = [f"### G(D) = bpb_arm − bpb_{ref} on `{primary}` (mean over seeds [95% t-CI], paired by seed)", "",
           "| D (tokens) | " + " | ".join(f"`{a}`" for a in res["gap"]) + " |", "|---:|" + "---:|" * len(res["gap"])]
  tokens = [g["tokens"] for g in next(iter(res["gap"].values()))]
  for i, t in enumerate(tokens):
    lines.append(f"| {t:,} | " + " | ".join(_fmt(g[i]) for g in res["gap"].values()) + " |")
  lines += ["", f"### bpb on `{primary}` of each arm's chosen point (seed mean ± sd)", "",
            "| arm | chosen | D: " + " | ".join(f"{t:,}" for t in res["tokens"]) + " |",
            "|---|---|" + "---:|" * len(res["tokens"])]
  for arm, c in res["curves"].items():
    v = np.asarray(list(c["by_seed"].values()))
    sd = v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1])
    lines.append(f"| `{arm}` | {c['combo']} ({len(v)} seeds) | " +
                 " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(v.mean(0), sd)) + " |")
  lines += ["", "### Improvement per doubling (seed means, bpb)", "", "| arm | " +
            " | ".join(f"→{d['to']:,}" for d in next(iter(res["doubling"].values()))) + " |",
            "|---|" + "---:|" * len(next(iter(res["doubling"].values())))]
  for arm, ds in res["doubling"].items():
    lines.append(f"| `{arm}` | " + " | ".join(f"{d['gain']:.4f}" for d in ds) + " |")
  c = res["conditions"]
  lines += ["", "### Pre-registered conditions", "",
            f"1. G grows over the last 3 doublings: **{c['1_gap_grows']['holds']}** (means "
            f"{', '.join(f'{x:+.4f}' for x in c['1_gap_grows']['last_means'])}; G(D_7) − G(D_4) "
            f"{_fmt(c['1_gap_grows']['growth'])}; G(D_7) {_fmt(c['1_gap_grows']['final'])})",
            f"2. LoRA's gain per doubling < 1/4 of full FT's: **{c['2_gain_ratio']['holds']}** (last 3 doublings: "
            f"{c['2_gain_ratio']['lora']:.4f} vs {c['2_gain_ratio']['ref']:.4f}, ratio "
            f"{c['2_gain_ratio']['ratio']:.2f})" if c["2_gain_ratio"]["ratio"] is not None else "2. -",
            f"3. G shrinks with rank, full rank closes most: **{c['3_rank']['holds']}** (final G: "
            f"{', '.join(f'{a} {v:+.4f}' for a, v in c['3_rank']['final_gap'].items())})",
            f"4. rho falls: **{c['4_rho_falls']['holds']}** (" +
            ", ".join(f"step {s}: {v['mean']:.4f}" for s, v in c["4_rho_falls"]["rho"].items()) + ")",
            f"- Refuted check (best reference-share LoRA within 2 seed-SDs at every D): "
            f"**{c['refuted_check']['holds']}** (" + ", ".join(
                f"{r['tokens']:,}: {r['best']} {r['diff']:+.4f} vs ±{r['tol']:.4f}" for r in c["refuted_check"]["rows"])
            + ")", f"- **Reading: {c['reading']}**"]
  return "\n".join(lines) + "\n"


def report(root: str, out: str, data: str | None, ref: str, lora: str, ranks: list[str], candidates: list[str],
           primary: str = "target_spec", source: str = "source_heldout", sets=None, log=print) -> dict:
  from jaxtele.eval import saturation_plots

  summary = read_summary(root)
  sets = sets or [primary, "target_clause", source, "general_heldout"]
  curves = {s: chosen_curves(summary, s) for s in sets}
  for arm in [ref, lora] + ranks + candidates:
    if arm not in curves[primary]:
      raise JaxteleError(f"--sweep: arm {arm!r} has no finished chosen point in {root}/summary.json")
  gap = {s: gaps(curves[s], ref) for s in sets}
  rho, intr, lam = diagnostics(root, summary)
  points = frontier(summary, primary, source)
  res = {"primary": primary, "ref": ref, "tokens": curves[primary][ref]["tokens"], "curves": curves[primary],
         "gap": gap[primary], "gap_all_sets": gap, "curves_all_sets": curves,
         "doubling": {a: per_doubling(c) for a, c in curves[primary].items()},
         "conditions": conditions(curves[primary], gap[primary], rho, lora, ref, ranks, candidates),
         "rho": rho, "intruders": intr, "lambda": lam,
         "frontier": frontier_reading(points, curves[primary], curves[source], ref)}
  if data:
    res["baselines"] = {"unigram_bpb": unigram_bpb(os.path.join(data, "target_train.jsonl"),
                                                   os.path.join(data, f"{primary}.jsonl")), "uniform_bpb": 8.0}
  os.makedirs(out, exist_ok=True)
  json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1, default=str)
  open(os.path.join(out, "results.md"), "w").write(markdown(res))
  saturation_plots.write_all(res, points, out)
  log(f"wrote {out}/results.json, results.md and plots; reading: {res['conditions']['reading']}")
  return res


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.eval.saturation", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  q = sub.add_parser("post", help="diagnose every checkpoint and run the lambda test at each chosen point")
  q.add_argument("--sweep", required=True, help="the sweep's root folder")
  r = sub.add_parser("report", help="tables, conditions and plots")
  r.add_argument("--sweep", required=True)
  r.add_argument("--out", required=True)
  r.add_argument("--data", default="runs/analog/data", help="the corpora (for the unigram baseline); '' to skip")
  r.add_argument("--ref", default="full")
  r.add_argument("--lora", default="lora_r1", help="the claim's LoRA arm")
  r.add_argument("--ranks", default="lora_r1,lora_r4,lora_r24", help="arms in increasing rank")
  r.add_argument("--candidates", default="lora_r1,lora_r1_emb", help="arms for the 'refuted' check")
  a = p.parse_args(argv)
  if a.command == "post":
    post(a.sweep)
  else:
    report(a.sweep, a.out, a.data or None, a.ref, a.lora, a.ranks.split(","), a.candidates.split(","))
  return 0


if __name__ == "__main__":
  sys.exit(main())
