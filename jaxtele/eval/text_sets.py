"""Packed text sets for perplexity, built the way the trainer builds `eval.sets` (`jaxtele.data.setup.eval_data`:
every record once, in order, last batch padded), plus one source only evaluation needs: the held-out clauses of
raw 3GPP Markdown (`{type: 3gpp, path, eval_fraction, holdout, heldout_specs, heldout_spec_fraction}`), the same
clauses `python -m jaxtele.data prepare` puts in its `eval` split (holdout: clause) or `eval_spec` split (holdout:
spec) given the same fractions and specs."""

import collections
import copy

from jaxtele.data import pipeline, threegpp
from jaxtele.data.prepare import Holdout
from jaxtele.data.sources import make_source
from jaxtele.errors import JaxteleError


class HeldOutClauses:
  """Clause documents of a folder of 3GPP specs in the eval split (or the train split), by the rule of
  `prepare.Holdout`: holdout `clause` = held-out clauses of the specs not held out, `spec` = held-out specs."""

  def __init__(self, path: str, eval_fraction: float = 0.02, split: str = "eval", limit: int = 0,
               holdout: str = "clause", heldout_specs=(), heldout_spec_fraction: float = 0.0):
    if split not in ("eval", "train"):
      raise JaxteleError(f"{path}: 3gpp split must be 'eval' or 'train', got {split!r}")
    if holdout not in ("clause", "spec"):
      raise JaxteleError(f"{path}: 3gpp holdout must be 'clause' or 'spec', got {holdout!r}")
    rule = Holdout(eval_fraction, heldout_specs, heldout_spec_fraction)
    if holdout == "spec" and not rule.by_spec:
      raise JaxteleError(f"{path}: holdout 'spec' needs heldout_specs or heldout_spec_fraction")
    clauses = threegpp.read_specs(path)
    rule.check_named([c.id for c in clauses], path)
    want = "train" if split == "train" else {"clause": "eval", "spec": "eval_spec"}[holdout]
    self.records = [{"id": c.id, "text": c.text} for c in clauses if rule.split(c.id) == want]
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
  unknown = set(spec) - {"path", "eval_fraction", "split", "limit", "holdout", "heldout_specs", "heldout_spec_fraction"}
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
