"""Packed text sets for perplexity, built the way the trainer builds `eval.sets` (`jaxtele.data.setup.eval_data`:
every record once, in order, last batch padded), plus one source only evaluation needs: the held-out clauses of
raw 3GPP Markdown (`{type: 3gpp, path, eval_fraction}`), the same clauses `python -m jaxtele.data prepare` puts
in its `eval` split."""

import collections
import copy

from jaxtele.data import pipeline, threegpp
from jaxtele.data.prepare import is_eval
from jaxtele.data.sources import make_source
from jaxtele.errors import JaxteleError


class HeldOutClauses:
  """Clause documents of a folder of 3GPP specs whose id falls in the eval split (or the train split)."""

  def __init__(self, path: str, eval_fraction: float = 0.02, split: str = "eval", limit: int = 0):
    if split not in ("eval", "train"):
      raise JaxteleError(f"{path}: 3gpp split must be 'eval' or 'train', got {split!r}")
    clauses = threegpp.read_specs(path)
    self.records = [{"id": c.id, "text": c.text} for c in clauses
                    if is_eval(c.id, eval_fraction) == (split == "eval")]
    if limit:
      self.records = self.records[:limit]
    self.stats = collections.Counter()

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def open_source(spec: dict, where: str):
  spec = dict(spec)
  if spec.get("type") != "3gpp":
    src = make_source(spec, where)
    if not len(src):
      raise JaxteleError(f"{where}: {spec.get('path') or spec.get('name')} gives an empty evaluation set")
    return src
  spec.pop("type")
  spec.pop("weight", None)
  unknown = set(spec) - {"path", "eval_fraction", "split", "limit"}
  if unknown:
    raise JaxteleError(f"{where}: unknown key {sorted(unknown)[0]!r} for a 3gpp source")
  src = HeldOutClauses(**spec)
  if not len(src):
    raise JaxteleError(f"{where}: {spec.get('path')} holds no clauses in split {spec.get('split', 'eval')!r}")
  return src


def build_sets(sets, data_cfg, batch_size: int, doc_tok) -> dict:
  """{name: dataset of packed batches} for a list of `{name, sources, format}` specs (the `eval.sets` format)."""
  out = {}
  for i, spec in enumerate(sets):
    where = f"perplexity.sets[{i}]"
    if not spec.get("sources"):
      raise JaxteleError(f"{where}.sources: an empty evaluation set (no sources)")
    dcfg = copy.deepcopy(data_cfg)
    dcfg.unlock()
    dcfg.sources = list(spec["sources"])
    dcfg.format = spec.get("format", data_cfg.format)
    dcfg.batch_size = batch_size
    dcfg.workers = 0
    sources = [open_source(s, f"{where}.sources[{j}]") for j, s in enumerate(spec["sources"])]
    weights = [float(s.get("weight", 1.0)) for s in spec["sources"]]
    out[spec.get("name", f"set{i}")] = pipeline.build(dcfg, doc_tok, sources=sources, weights=weights, train=False)
  return out
