"""Corpus preparation: 3GPP Markdown -> clause documents -> token ids -> a TFDS ArrayRecord dataset.

The dataset (splits `train` and `eval`, and `eval_spec` when whole specs are held out; features `id`, `text`,
`tokens`) is built and read by `tensorflow-datasets` without TensorFlow; `stats.json` beside it records what
went in and what was left out. Two held-out splits, both stable across runs and corpus growth:
- `eval_spec`: every clause of the held-out specs (named, or a fraction of specs by a hash of the spec number).
  Templated sibling clauses (RF requirements per band...) leak across a clause split; a whole spec cannot.
- `eval`: clauses of the other specs whose id hashes below `eval_fraction`.
No clause of a held-out spec is ever in `train` or `eval`.
"""

import collections
import hashlib
import dataclasses
import json
import os
import re
import time

import numpy as np

from jaxtele.data import threegpp
from jaxtele.data.tokenize import DocTokenizer
from jaxtele.errors import JaxteleError
from jaxtele.progress import Progress

DATASET_NAME = "telecom_corpus"
TOKENIZE_CHUNK = 1024  # clauses per tokenizer call: one progress line each, fast tokenizers batch within


def hash_fraction(key: str) -> float:
  """A stable number in [0, 1) for a string: the first 8 bytes of its SHA-256."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def is_eval(doc_id: str, eval_fraction: float) -> bool:
  return hash_fraction(doc_id) < eval_fraction


SPEC_OF_ID = re.compile(r"^(TS \d{2}\.\d{3}(?:-\d+)?) ")


def spec_of(doc_id: str) -> str:
  """The spec a clause id names (`threegpp.Clause.id` = spec + clause number): "TS 38.101-1 5.2" -> "TS 38.101-1";
  a spec named after a file that is not a 3GPP number is the id's first word."""
  m = SPEC_OF_ID.match(doc_id)
  return m.group(1) if m else doc_id.split(" ", 1)[0]


def spec_key(name: str) -> str:
  """"TS 38.101-1", "ts 38.101-1" and "38.101-1" name one spec."""
  name = name.strip()
  return name[3:].strip() if name[:3].upper() in ("TS ", "TR ") else name


@dataclasses.dataclass(frozen=True)
class Holdout:
  """Which split a clause id falls in: `eval_spec` (its spec is held out), `eval` or `train`."""
  eval_fraction: float = 0.02
  specs: tuple = ()  # spec numbers held out by name ("38.101-1" or "TS 38.101-1")
  spec_fraction: float = 0.0  # and every spec whose number hashes below this

  def __post_init__(self):
    specs = self.specs.split(",") if isinstance(self.specs, str) else self.specs
    object.__setattr__(self, "specs", tuple(sorted({spec_key(s) for s in specs if s.strip()})))
    if not 0.0 <= self.spec_fraction < 1.0:
      raise JaxteleError(f"heldout_spec_fraction: must be in [0, 1), got {self.spec_fraction}")

  @property
  def by_spec(self) -> bool:
    return bool(self.specs) or self.spec_fraction > 0

  def spec_held_out(self, spec: str) -> bool:
    key = spec_key(spec)
    return key in self.specs or hash_fraction(key) < self.spec_fraction

  def split(self, doc_id: str) -> str:
    if self.spec_held_out(spec_of(doc_id)):
      return "eval_spec"
    return "eval" if is_eval(doc_id, self.eval_fraction) else "train"

  def check_named(self, doc_ids, where: str):
    """Every named spec must be in the corpus: a typo would silently hold out nothing."""
    present = {spec_key(spec_of(i)) for i in doc_ids}
    missing = [s for s in self.specs if s not in present]
    if missing:
      raise JaxteleError(f"{where}: held-out spec {missing[0]} is not in the corpus (it holds "
                         f"{', '.join(sorted(present)[:8])}{', ...' if len(present) > 8 else ''})")


def length_histogram(lengths) -> dict[str, int]:
  """Counts per power-of-two bucket: '<=64', '<=128', ..."""
  hist = collections.Counter()
  for n in lengths:
    hist[int(2 ** max(6, np.ceil(np.log2(max(n, 1)))))] += 1
  return {f"<={k}": hist[k] for k in sorted(hist)}


def _builder_class():
  import tensorflow_datasets as tfds

  class TelecomCorpus(tfds.core.GeneratorBasedBuilder):
    """Tokenized clause documents; `self.docs` = {split: [(id, text, tokens)]} is set before building."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(), "text": tfds.features.Text(),
          "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(docs) for split, docs in self.docs.items()}

    def _generate_examples(self, docs):
      for doc_id, text, tokens in docs:
        yield doc_id, {"id": doc_id, "text": text, "tokens": tokens}

  return TelecomCorpus


def prepare_3gpp(input_dir: str, out_dir: str, tokenizer, vocab_size: int, eval_fraction: float = 0.02,
                 overwrite: bool = False, log=print, heldout_specs=(), heldout_spec_fraction: float = 0.0) -> dict:
  """Write the dataset under `out_dir`; returns the stats (also written to `out_dir/stats.json`).
  `heldout_specs` (names) and `heldout_spec_fraction` hold whole specs out in the `eval_spec` split."""
  holdout = Holdout(eval_fraction, heldout_specs, heldout_spec_fraction)
  if os.path.exists(os.path.join(out_dir, "stats.json")) and not overwrite:
    raise JaxteleError(f"{out_dir}: already holds a prepared dataset (pass --overwrite to rebuild it)")
  t0 = time.time()
  doc_tok = DocTokenizer(tokenizer, vocab_size)
  count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
  dropped = collections.Counter()
  clauses = threegpp.read_specs(input_dir, dropped, measure=count)
  if not clauses:
    raise JaxteleError(f"{input_dir}: no clauses found in any .md file")
  holdout.check_named([c.id for c in clauses], input_dir)
  token_lists, tick = [], Progress("prepare: tokenize", len(clauses), "clauses")
  for i in range(0, len(clauses), TOKENIZE_CHUNK):
    token_lists += doc_tok.encode_batch([c.text for c in clauses[i:i + TOKENIZE_CHUNK]])
    tick(len(token_lists))
  t_tok = time.time() - t0
  docs = {"train": [], "eval": [], "eval_spec": []}
  for c, ids in zip(clauses, token_lists, strict=True):
    docs[holdout.split(c.id)].append((c.id, c.text, ids))
  if not docs["eval_spec"]:
    if holdout.by_spec:
      log(f"note: no spec fell below heldout_spec_fraction {heldout_spec_fraction}: no eval_spec split")
    del docs["eval_spec"]
  if os.path.isdir(os.path.join(out_dir, DATASET_NAME)) and overwrite:
    import shutil

    shutil.rmtree(os.path.join(out_dir, DATASET_NAME))
  builder = _builder_class()(data_dir=out_dir, file_format="array_record")
  builder.docs = docs
  builder.download_and_prepare()
  lengths = [len(ids) for ids in token_lists]
  stats = {
      "source": os.path.abspath(input_dir),
      "dataset_dir": builder.data_dir,
      "tokenizer_vocab_size": vocab_size,
      "documents": {split: len(d) for split, d in docs.items()},
      "tokens": {split: int(sum(len(x[2]) for x in d)) for split, d in docs.items()},
      "specs": {split: len({spec_of(x[0]) for x in d}) for split, d in docs.items()},
      "heldout_specs": sorted({spec_of(x[0]) for x in docs.get("eval_spec", [])}),
      "heldout_spec_fraction": heldout_spec_fraction,
      "length_histogram": length_histogram(lengths),
      "max_document_tokens": int(max(lengths)),
      "tokens_dropped": dict(dropped),
      "eval_fraction": eval_fraction,
      "seconds": {"tokenize": round(t_tok, 2), "total": round(time.time() - t0, 2)},
  }
  with open(os.path.join(out_dir, "stats.json"), "w") as f:
    json.dump(stats, f, indent=2)
  log(format_stats(stats))
  return stats


def format_stats(s: dict) -> str:
  total = sum(s["tokens"].values())
  lines = [f"prepared {sum(s['documents'].values())} documents, {total:,} tokens -> {s['dataset_dir']}",
           "  " + ", ".join(f"{k}: {s['specs'][k]} specs / {s['documents'][k]} docs / {s['tokens'][k]:,} tokens"
                            for k in s["documents"]),
           "  dropped tokens: " + (", ".join(f"{k} {v:,}" for k, v in s["tokens_dropped"].items()) or "none"),
           "  length histogram: " + ", ".join(f"{k}: {v}" for k, v in s["length_histogram"].items()),
           f"  {s['seconds']['total']} s ({total / max(s['seconds']['total'], 1e-9):,.0f} tokens/s)"]
  return "\n".join(lines)
