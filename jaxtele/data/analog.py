"""The corpora of the scaled analog experiment (docs/experiments/lora_saturation_analog.md), as JSONL text files:
a SOURCE domain to pretrain a tiny base on, and a TARGET domain with a real shift to continue pretraining on.

  python -m jaxtele.data.analog --data ../shared/data --out runs/analog/data

SOURCE: the core-network specs (TS 23.501, 23.502, 24.301) + WikiText-2 articles + Alpaca records.
TARGET: the RF/PHY specs (TS 38.101-x, 38.104, 38.201..38.215), tables and numbers.
Files written (one {"id", "text"} object per line) and what they hold:
  source_train       source clauses not held out, WikiText articles not held out, every Alpaca record
  source_heldout     source clauses held out by clause (id hash < clause_fraction): forgetting of the source
  general_heldout    paragraphs of the WikiText articles held out (title hash < general_fraction): general English
  target_train       target clauses of the specs not held out, minus the clauses held out by clause (a hash-ordered
                     sample of `train_bytes`: more than a run reads, so no document is seen twice, and less to
                     tokenize at each run's start)
  target_clause      target clauses held out by clause (their specs' siblings are in target_train)
  target_spec        every clause of the held-out target specs (no clause of those specs is trained on)
An eval file keeps a hash-ordered sample of its split up to `eval_bytes` (the sample is what is scored, in full);
stats.json records each split's full size and the fraction the sample is of it.
"""

import argparse
import json
import os
import re
import sys

from jaxtele.data import threegpp
from jaxtele.data.prepare import hash_fraction, spec_key, spec_of
from jaxtele.errors import JaxteleError, cli

SOURCE_SPECS = ("23.501", "23.502", "24.301")
TARGET_SPEC = re.compile(r"^38\.(1\d\d|2\d\d)(-\d+)?$")  # RF (38.1xx) and PHY (38.2xx)
TARGET_HELDOUT = ("38.211", "38.101-5")  # one PHY spec, one RF spec
WIKI_TITLE = re.compile(r"^ = [^=].* = $")
EVAL_FILES = ("source_heldout", "general_heldout", "target_clause", "target_spec")


def wiki_articles(path: str) -> list[tuple[str, str]]:
  """(title, text) per WikiText-2 article: a ` = Title = ` line opens one."""
  arts, title, lines = [], None, []
  for line in open(path, encoding="utf-8").read().splitlines():
    if WIKI_TITLE.match(line):
      if title and "".join(lines).strip():
        arts.append((title, "\n".join([f" = {title} = "] + lines).strip()))
      title, lines = line.strip(" =").strip(), []
    elif title is not None:
      lines.append(line)
  if title and "".join(lines).strip():
    arts.append((title, "\n".join([f" = {title} = "] + lines).strip()))
  return arts


def alpaca_texts(path: str) -> list[tuple[str, str]]:
  items = json.load(open(path, encoding="utf-8"))
  return [(f"alpaca:{i}", "\n".join(x for x in (r["instruction"], r.get("input", ""), r["output"]) if x))
          for i, r in enumerate(items)]


def sample(docs: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
  """Documents in the order of their id's hash, up to `budget` UTF-8 bytes (0: all), in that order."""
  if not budget:
    return docs
  out, used = [], 0
  for doc in sorted(docs, key=lambda d: hash_fraction("sample:" + d[0])):
    n = len(doc[1].encode())
    if used + n > budget and out:
      continue
    out.append(doc)
    used += n
    if used >= budget:
      break
  return out


def build(data: str, out: str, clause_fraction: float = 0.02, general_fraction: float = 0.2,
          heldout_specs=TARGET_HELDOUT, eval_bytes: int = 16384, train_bytes: int = 3 << 20, log=print) -> dict:
  specs_dir = os.path.join(data, "3gpp")
  if not os.path.isdir(specs_dir):
    raise JaxteleError(f"--data: {specs_dir} is not a folder of 3GPP specs")
  held = {spec_key(s) for s in heldout_specs}
  files = {k: [] for k in ("source_train", "target_train") + EVAL_FILES}
  present = set()
  for name in sorted(os.listdir(specs_dir)):
    if not name.endswith(".md"):
      continue
    number = spec_key(threegpp.spec_number(name))
    present.add(number)
    source, target = number in SOURCE_SPECS, bool(TARGET_SPEC.match(number))
    if not (source or target):
      continue
    for c in threegpp.read_specs_file(os.path.join(specs_dir, name)):
      by_clause = hash_fraction(c.id) < clause_fraction
      if source:
        files["source_heldout" if by_clause else "source_train"].append((c.id, c.text))
      elif spec_key(spec_of(c.id)) in held:
        files["target_spec"].append((c.id, c.text))
      else:
        files["target_clause" if by_clause else "target_train"].append((c.id, c.text))
  missing = sorted(held - present) + sorted(set(SOURCE_SPECS) - present)
  if missing:
    raise JaxteleError(f"--data: spec {missing[0]} is not in {specs_dir}")
  for title, text in wiki_articles(os.path.join(data, "wikitext2", "wiki.test.raw")):
    if hash_fraction("wiki:" + title) >= general_fraction:
      files["source_train"].append((f"wiki:{title}", text))
    else:  # held out by article; sampled by paragraph, so the sample spans many articles
      paras = [p for p in text.split("\n") if len(p.strip()) > 80]
      files["general_heldout"] += [(f"wiki:{title}:{i}", p.strip()) for i, p in enumerate(paras)]
  files["source_train"] += alpaca_texts(os.path.join(data, "alpaca", "alpaca_5000.json"))
  os.makedirs(out, exist_ok=True)
  stats = {"heldout_specs": sorted(held), "clause_fraction": clause_fraction, "general_fraction": general_fraction,
           "eval_bytes": eval_bytes, "train_bytes": train_bytes, "files": {}}
  for key, docs in files.items():
    full = sum(len(t.encode()) for _, t in docs)
    kept = sample(docs, eval_bytes) if key in EVAL_FILES else sample(docs, train_bytes) if key == "target_train" \
        else docs
    nbytes = sum(len(t.encode()) for _, t in kept)
    with open(os.path.join(out, key + ".jsonl"), "w") as f:
      for doc_id, text in kept:
        f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    stats["files"][key] = {"documents": len(kept), "bytes": nbytes, "split_documents": len(docs),
                           "split_bytes": full, "fraction_of_split": nbytes / max(full, 1)}
    log(f"{key:16s} {len(kept):6d} docs {nbytes:11,d} bytes ({nbytes / max(full, 1):.1%} of {full:,})")
  with open(os.path.join(out, "stats.json"), "w") as f:
    json.dump(stats, f, indent=1)
  return stats


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.data.analog", description=__doc__.splitlines()[0])
  p.add_argument("--data", default="../shared/data", help="the shared data folder (3gpp/, wikitext2/, alpaca/)")
  p.add_argument("--out", default="runs/analog/data")
  p.add_argument("--eval-bytes", type=int, default=16384, help="bytes kept per eval file (0: the whole split)")
  p.add_argument("--train-bytes", type=int, default=3 << 20, help="bytes kept of target_train (0: all)")
  p.add_argument("--heldout-specs", default=",".join(TARGET_HELDOUT), help="target specs held out whole")
  a = p.parse_args(argv)
  if a.eval_bytes < 0 or a.train_bytes < 0:
    raise JaxteleError(f"--eval-bytes / --train-bytes: must be >= 0, got {a.eval_bytes} / {a.train_bytes}")
  build(a.data, a.out, heldout_specs=[s for s in a.heldout_specs.split(",") if s.strip()], eval_bytes=a.eval_bytes,
        train_bytes=a.train_bytes)
  return 0


if __name__ == "__main__":
  sys.exit(main())
