"""`python -m jaxtele.eval.compare RESULTS_A RESULTS_B [--out F] [--samples N] [--seed S]`: two models evaluated by
`python -m jaxtele.eval` on the same sets, compared item by item from their `predictions/` folders:

  multiple choice (`mcq_<set>.jsonl`)  exact McNemar test on the items both answered (matched by id)
  perplexity (`ppl_<set>.jsonl`)       paired bootstrap over documents of the loss, perplexity, bits-per-byte gaps
  open questions (`qa_<set>.jsonl`)    paired bootstrap over items of the token-F1 gap

Differences are A - B. A table on stdout (and in F: Markdown, or JSON when F ends in .json) says which model is
better, or "not distinguishable at 95%" when the interval covers 0 (McNemar: p >= 0.05).
"""

import glob
import json
import math
import os
import sys

import numpy as np

from jaxtele.errors import JaxteleError, cli
from jaxtele.eval import stats
from jaxtele.eval.items import json_records

USAGE = "usage: python -m jaxtele.eval.compare RESULTS_A RESULTS_B [--out F] [--samples N] [--seed S]"
KINDS = ("mcq", "ppl", "qa")
FIELDS = {"mcq": ("answer", "pred"), "ppl": ("nll", "tokens", "bytes"), "qa": ("f1",)}


def prediction_files(folder: str) -> dict:
  """{(kind, set): path} of a results folder's per-item predictions."""
  if not os.path.isdir(folder):
    raise JaxteleError(f"{folder}: no such results folder")
  preds = os.path.join(folder, "predictions")
  found = {}
  for kind in KINDS:
    for path in sorted(glob.glob(os.path.join(preds, f"{kind}_*.jsonl"))):
      found[(kind, os.path.basename(path)[len(kind) + 1:-len(".jsonl")])] = path
  if not found:
    raise JaxteleError(f"{folder}: no predictions/{{mcq,ppl,qa}}_<set>.jsonl (is it an output of "
                       "python -m jaxtele.eval?)")
  return found


def read_rows(path: str, kind: str) -> dict:
  """{id: row} with the fields the comparison needs checked, every problem named by file and line."""
  rows = {}
  for _, row, line in json_records(path):
    where = f"{path}:{line}"
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
      raise JaxteleError(f"{where}: needs a string 'id'")
    for key in FIELDS[kind]:
      value = row.get(key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JaxteleError(f"{where}: needs a finite number {key!r}")
    if row["id"] in rows:
      raise JaxteleError(f"{where}: id {row['id']!r} appears twice")
    rows[row["id"]] = row
  if not rows:
    raise JaxteleError(f"{path}: no rows")
  return rows


def matched(path_a: str, path_b: str, kind: str) -> tuple[list, list]:
  """The two files' rows in the same item order; both must hold the same items."""
  a, b = read_rows(path_a, kind), read_rows(path_b, kind)
  if a.keys() != b.keys():
    only = sorted(a.keys() - b.keys())
    which, other, ex = (path_a, path_b, only[0]) if only else (path_b, path_a, sorted(b.keys() - a.keys())[0])
    raise JaxteleError(f"{which}: item {ex!r} is not in {other} ({len(a)} vs {len(b)} items): not the same set")
  ids = list(a)
  if kind == "mcq":
    for i in ids:
      if a[i]["answer"] != b[i]["answer"]:
        raise JaxteleError(f"{path_b}: item {i!r} has answer {b[i]['answer']}, {path_a} {a[i]['answer']}: "
                           "not the same items")
  return [a[i] for i in ids], [b[i] for i in ids]


def compare_mcq(rows_a, rows_b) -> list[dict]:
  out = []
  for field in ("pred", "pred_norm"):
    if not all(field in r for r in rows_a + rows_b):
      continue
    hit_a = np.asarray([r[field] == r["answer"] for r in rows_a])
    hit_b = np.asarray([r[field] == r["answer"] for r in rows_b])
    only_a, only_b = int((hit_a & ~hit_b).sum()), int((~hit_a & hit_b).sum())
    p = stats.mcnemar_exact(only_a, only_b)
    diff = float(hit_a.mean() - hit_b.mean())
    out.append({"metric": "accuracy" + ("" if field == "pred" else " (length-normalised)"), "a": float(hit_a.mean()),
                "b": float(hit_b.mean()), "diff": diff, "p": p, "only_a": only_a, "only_b": only_b,
                "units": len(rows_a), "verdict": stats.verdict(p < 1 - stats.LEVEL, diff, True)})
  return out


def _bootstrap_row(metric, a, b, r, higher_is_better):
  return {"metric": metric, "a": a, "b": b, **r, "verdict": stats.verdict(r["distinguishable"], r["diff"],
                                                                         higher_is_better)}


def compare_ppl(rows_a, rows_b, samples, seed) -> list[dict]:
  col = lambda rows, k: np.asarray([r[k] for r in rows], np.float64)  # noqa: E731
  nll_a, tok_a, byt_a = col(rows_a, "nll"), col(rows_a, "tokens"), col(rows_a, "bytes")
  nll_b, tok_b, byt_b = col(rows_b, "nll"), col(rows_b, "tokens"), col(rows_b, "bytes")
  out = []
  for metric, den_a, den_b, scale, f in (("loss (nats/token)", tok_a, tok_b, 1.0, None),
                                         ("perplexity", tok_a, tok_b, 1.0, np.exp),
                                         ("bits per byte", byt_a, byt_b, 1 / math.log(2), None)):
    if den_a.sum() <= 0 or den_b.sum() <= 0:
      continue
    r = stats.paired_bootstrap(nll_a * scale, den_a, nll_b * scale, den_b, f, samples, seed)
    g = f or (lambda x: x)
    row = _bootstrap_row(metric, float(g(nll_a.sum() * scale / den_a.sum())),
                         float(g(nll_b.sum() * scale / den_b.sum())), r, False)
    if den_a is tok_a and not np.array_equal(tok_a, tok_b):
      row["note"] = "token counts differ (other tokenizers): per-token metrics are not comparable"
    out.append(row)
  return out


def compare_qa(rows_a, rows_b, samples, seed) -> list[dict]:
  f1_a = np.asarray([r["f1"] for r in rows_a], np.float64)
  f1_b = np.asarray([r["f1"] for r in rows_b], np.float64)
  ones = np.ones_like(f1_a)
  r = stats.paired_bootstrap(f1_a, ones, f1_b, ones, None, samples, seed)
  return [_bootstrap_row("token F1", float(f1_a.mean()), float(f1_b.mean()), r, True)]


def compare(folder_a: str, folder_b: str, samples: int = 2000, seed: int = 0) -> dict:
  files_a, files_b = prediction_files(folder_a), prediction_files(folder_b)
  common = [k for k in files_a if k in files_b]
  if not common:
    raise JaxteleError(f"{folder_a}, {folder_b}: no prediction set in common ({', '.join(map('_'.join, files_a))} "
                       f"vs {', '.join(map('_'.join, files_b))})")
  rows = []
  for kind, name in common:
    a, b = matched(files_a[(kind, name)], files_b[(kind, name)], kind)
    got = (compare_mcq(a, b) if kind == "mcq" else compare_ppl(a, b, samples, seed) if kind == "ppl"
           else compare_qa(a, b, samples, seed))
    rows += [{"task": kind, "set": name, **r} for r in got]
  only = sorted({"_".join(k) for k in files_a.keys() ^ files_b.keys()})
  return {"a": folder_a, "b": folder_b, "level": stats.LEVEL, "samples": samples, "seed": seed, "rows": rows,
          "not_compared": only}


def markdown(result: dict) -> str:
  lines = [f"# Paired comparison: A = `{result['a']}`, B = `{result['b']}`", "",
           f"Differences are A - B; bootstrap {result['samples']} resamples of the units (seed {result['seed']}), "
           f"McNemar exact on the items only one model got right.", "",
           "| task | set | metric | units | A | B | A - B | 95% CI / p | verdict |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    test = (f"p = {r['p']:.3g} ({r['only_a']} vs {r['only_b']} discordant)" if "p" in r
            else f"[{r['ci'][0]:+.4g}, {r['ci'][1]:+.4g}]")
    verdict = r["verdict"] + (f" ({r['note']})" if r.get("note") else "")
    lines.append(f"| {r['task']} | {r['set']} | {r['metric']} | {r['units']} | {r['a']:.4g} | {r['b']:.4g} | "
                 f"{r['diff']:+.4g} | {test} | {verdict} |")
  if result["not_compared"]:
    lines += ["", f"Only in one folder (not compared): {', '.join(result['not_compared'])}."]
  return "\n".join(lines) + "\n"


def _int(flag, value):
  try:
    return int(value)
  except ValueError:
    raise JaxteleError(f"{flag}: needs an integer, got {value!r} ({USAGE})") from None


@cli
def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  folders, out, samples, seed = [], None, 2000, 0
  i = 0
  while i < len(argv):
    flag, eq, value = argv[i].partition("=")
    if flag in ("--out", "--samples", "--seed"):
      if not eq:
        if i + 1 >= len(argv):
          raise JaxteleError(f"{flag}: needs a value ({USAGE})")
        value, i = argv[i + 1], i + 1
      if flag == "--out":
        out = value
      elif flag == "--samples":
        samples = _int(flag, value)
      else:
        seed = _int(flag, value)
    elif argv[i].startswith("--"):
      raise JaxteleError(f"unknown argument {argv[i]!r} ({USAGE})")
    else:
      folders.append(argv[i])
    i += 1
  if len(folders) != 2:
    raise JaxteleError(f"need two results folders, got {len(folders)} ({USAGE})")
  if samples < 100:
    raise JaxteleError(f"--samples: at least 100 resamples for a 95% interval, got {samples}")
  result = compare(folders[0], folders[1], samples, seed)
  text = markdown(result)
  print(text, end="")
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(json.dumps(result, indent=2) + "\n" if out.endswith(".json") else text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
