"""The Grain input pipeline: sources -> per-process shard -> [cut into pieces] -> shuffle -> tokenize -> mix ->
pack -> batch.

Deterministic for a seed; the iterator's state (`it.get_state()` / `it.set_state()`) is what a
checkpoint stores, so a restored run sees exactly the batches an uninterrupted one would have.
"""

import collections

import grain
import ml_collections
import numpy as np

from jaxtele.data import sft
from jaxtele.data.packing import PACKINGS, lm_example, pack
from jaxtele.data.pieces import DocumentPieces
from jaxtele.data.sources import make_source
from jaxtele.data.tokenize import DocTokenizer
from jaxtele.errors import JaxteleError
from jaxtele.schema import BOOL, NONNEG, POSITIVE, TUPLE, Rule, choice, defaults, rules

FORMATS = ("text", "tokens", "sft")


def schema() -> dict:
  """The data keys, each `rule(default)` (jaxtele/schema.py): `data` in a training config, `perplexity.data` in
  an evaluation config."""
  return {
      # Each source: {type: text|jsonl|json|parquet|tfds, path|name, weight, field, fields, split, ...}.
      "sources": TUPLE(()),
      # text: raw documents; tokens: prepared token ids; sft: instruction records
      "format": choice(*FORMATS)("text"),
      "sft_template": choice(*sft.TEMPLATES)("alpaca"),
      "doc_end_token": Rule(str, optional=True)(None),
      "seq_len": Rule(int, lo=2)(512),
      "batch_size": POSITIVE(8),  # global, over all processes
      "packing": choice(*PACKINGS)("first_fit"),
      # text/tokens training streams: cut documents into seq_len pieces before the shuffle (data/pieces.py)
      "split_before_shuffle": BOOL(True),
      "num_packing_bins": POSITIVE(16),
      "shuffle": BOOL(True),
      "seed": NONNEG(0),
      "num_epochs": Rule(int, lo=1, optional=True)(None),  # None: repeat forever
      "workers": NONNEG(0),
  }


def default_config() -> ml_collections.ConfigDict:
  return defaults(schema(), lock=False)  # as before: a caller building a data config may add its own keys


class Formatter:
  """One source record -> one pre-shifted LM example (picklable, so it runs in Grain workers)."""

  def __init__(self, fmt: str, doc_tok: DocTokenizer, template: str):
    self.fmt, self.doc_tok, self.template = fmt, doc_tok, template

  def __call__(self, record):
    if self.fmt == "sft":
      return lm_example(*sft.encode_example(record, self.template, self.doc_tok))
    if self.fmt == "tokens":
      return lm_example(self.doc_tok.check(np.asarray(record["tokens"], np.int32), record.get("id", "record")))
    return lm_example(self.doc_tok.encode(record["text"], source=record.get("id", "document")))


def has_pairs(ex) -> bool:
  return len(ex["tokens"]) > 0


def validate(cfg, where="data"):
  """A data config, built by a recipe or in code, against `schema()`'s rules: one line naming `where.KEY`.

  A key the config lacks takes its default; a list of sources counts as the tuple it stands for.
  """
  for key, rule in rules(schema()).items():
    if key in cfg:
      value = cfg[key]
      rule.check(f"{where}.{key}", tuple(value) if isinstance(value, list) else value)
  if not cfg.sources:
    raise JaxteleError(f"config: {where}.sources: no data sources configured")


def open_sources(cfg, where="data"):
  """Build every source once; returns (sources, weights, stats of what they left out)."""
  sources, weights, stats = [], [], collections.Counter()
  for i, spec in enumerate(cfg.sources):
    spec = dict(spec)
    weights.append(float(spec.get("weight", 1.0)))
    src = make_source(spec, f"{where}.sources[{i}]")
    if len(src) == 0:
      raise JaxteleError(f"{where}.sources[{i}]: {spec.get('path') or spec.get('name')} holds no usable records")
    sources.append(src)
    stats.update(src.stats)
  return sources, weights, stats


def build(cfg, doc_tok: DocTokenizer, *, sources=None, weights=None, process_index=0, process_count=1,
          train=True) -> grain.IterDataset:
  """The dataset of batches for this process: dicts of int32 [batch / process_count, seq_len].

  `train=False` reads every record once, in order, and pads the last batch (loss_mask 0) instead of
  dropping it, for evaluation.
  """
  validate(cfg)
  if sources is None:
    sources, weights, _ = open_sources(cfg)
  if cfg.batch_size % process_count:
    raise JaxteleError(f"data.batch_size: {cfg.batch_size} is not divisible by {process_count} processes")
  fmt = Formatter(cfg.format, doc_tok, cfg.sft_template)
  presplit = train and cfg.get("split_before_shuffle", True) and cfg.format != "sft"
  streams = []
  for k, src in enumerate(sources):
    ds = grain.MapDataset.source(src)[process_index::process_count]
    if presplit:  # pieces come out formatted: the shuffle below mixes pieces, not whole documents
      ds = grain.MapDataset.source(DocumentPieces(ds, fmt, cfg.seq_len))
    if train:
      if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed + k)
      ds = ds.repeat(cfg.num_epochs)
    streams.append((ds if presplit else ds.map(fmt)).filter(has_pairs).to_iter_dataset())
  ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
  rows = pack(ds, cfg.seq_len, cfg.packing, cfg.num_packing_bins, cfg.seed)
  per_process = cfg.batch_size // process_count
  if train:
    batches = rows.batch(per_process, drop_remainder=True)
  else:
    batches = rows.batch(per_process, drop_remainder=False).map(PadBatch(per_process))
  if cfg.workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; plain scripts never parse them.
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
  return batches


class PadBatch:
  """Pad a short final batch with empty rows (segment 0, loss_mask 0) so shapes stay static."""

  def __init__(self, size):
    self.size = size

  def __call__(self, batch):
    n = len(batch["tokens"])
    if n == self.size:
      return batch
    return {k: np.concatenate([v, np.zeros((self.size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def packing_efficiency(batch) -> float:
  """Real tokens / slots in a batch."""
  return float(np.mean(np.asarray(batch["segment_ids"]) != 0))
