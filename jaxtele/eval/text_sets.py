"""Packed text sets for perplexity, built by the trainer's builder of `eval.sets` (`jaxtele.data.setup.packed_sets`:
every record once, in order, last batch padded), plus one source only evaluation needs: the held-out clauses of
raw 3GPP Markdown (`{type: 3gpp, path, eval_fraction, holdout, heldout_specs, heldout_spec_fraction}`), the same
clauses `python -m jaxtele.data prepare` puts in its `eval` split (holdout: clause) or `eval_spec` split (holdout:
spec) given the same fractions and specs."""

import re

from jaxtele.data import setup as data_setup, threegpp
from jaxtele.data.prepare import Holdout
from jaxtele.data.sources import Records, make_source
from jaxtele.errors import JaxteleError


class HeldOutClauses(Records):
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
    super().__init__()
    clauses = threegpp.read_specs(path)
    rule.check_named([c.id for c in clauses], path)
    want = "train" if split == "train" else {"clause": "eval", "spec": "eval_spec"}[holdout]
    self.records = [{"id": c.id, "text": c.text} for c in clauses if rule.split(c.id) == want][:limit or None]


class WikiTextArticles(Records):
  """WikiText raw text cut into its articles (a ` = Title = ` line opens one), so a set has documents to
  pair and sample; the articles joined give the file back."""

  TITLE = re.compile(r"^ = ([^=].*) = \r?$")

  def __init__(self, path: str):
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    except OSError as e:
      raise JaxteleError(f"{path}: cannot read the WikiText file ({e.strerror})") from None
    starts = [i for i, line in enumerate(lines) if self.TITLE.match(line)] or [0]
    starts[0] = 0  # text before the first title belongs to the first article
    super().__init__()
    for a, b in zip(starts, starts[1:] + [len(lines)]):
      m = self.TITLE.match(lines[a])
      text = "".join(lines[a:b])
      if text.strip():
        self.records.append({"id": m.group(1).strip() if m else f"article {len(self.records)}", "text": text})


def open_source(spec: dict, where: str):
  spec = dict(spec)
  if spec.get("type") == "wikitext":
    unknown = set(spec) - {"type", "path", "weight"}
    if unknown or not spec.get("path"):
      raise JaxteleError(f"{where}: a wikitext source takes a path only" +
                         (f" (unknown key {sorted(unknown)[0]!r})" if unknown else ""))
    return WikiTextArticles(spec["path"])
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
  """{name: dataset of packed batches} for a list of `{name, sources, format}` specs (the `eval.sets` format),
  built as the trainer builds its sets (`data.setup.packed_sets`), with this module's sources."""
  for i, spec in enumerate(sets):
    if not spec.get("sources"):
      raise JaxteleError(f"perplexity.sets[{i}].sources: an empty evaluation set (no sources)")
  return data_setup.packed_sets(sets, data_cfg, batch_size, doc_tok, open_source, "perplexity.sets")


def build_doc_sets(sets, data_cfg, batch_size: int, doc_tok, sample: float = 1.0, max_batches: int = 0) -> dict:
  """{name: documents.DocSet} for the same specs: every record of every source once, scored per document;
  a set's `sample` (default `sample`; 1: all) scores a stable fraction of its documents, and `max_batches` > 0
  about that many batches' worth of whole documents in a stable random order."""
  from jaxtele.eval import documents

  out = {}
  for i, spec in enumerate(sets):
    where = f"perplexity.sets[{i}]"
    if not spec.get("sources"):
      raise JaxteleError(f"{where}.sources: an empty evaluation set (no sources)")
    sources = [open_source(s, f"{where}.sources[{j}]") for j, s in enumerate(spec["sources"])]
    records = [src[k] for src in sources for k in range(len(src))]
    out[spec.get("name", f"set{i}")] = documents.doc_set(
        records, spec.get("format", data_cfg.format), doc_tok, batch_size, data_cfg.seq_len,
        float(spec.get("sample", sample)), data_cfg.sft_template, where, max_batches * batch_size * data_cfg.seq_len)
  return out
