"""Corpus preparation: 3GPP Markdown -> clause documents -> token ids -> a TFDS ArrayRecord dataset.

The dataset (splits `train` and `eval`, features `id`, `text`, `tokens`) is built and read by
`tensorflow-datasets` without TensorFlow; `stats.json` beside it records what went in and what was
left out. The split is by document id (a hash), so it is stable across runs and corpus growth.
"""

import collections
import hashlib
import json
import os
import time

import numpy as np

from jaxtele.data import threegpp
from jaxtele.data.tokenize import DocTokenizer
from jaxtele.errors import JaxteleError

DATASET_NAME = "telecom_corpus"


def is_eval(doc_id: str, eval_fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
  return h / 2**64 < eval_fraction


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
                 overwrite: bool = False, log=print) -> dict:
  """Write the dataset under `out_dir`; returns the stats (also written to `out_dir/stats.json`)."""
  if os.path.exists(os.path.join(out_dir, "stats.json")) and not overwrite:
    raise JaxteleError(f"{out_dir}: already holds a prepared dataset (pass --overwrite to rebuild it)")
  t0 = time.time()
  doc_tok = DocTokenizer(tokenizer, vocab_size)
  count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
  dropped = collections.Counter()
  clauses = threegpp.read_specs(input_dir, dropped, measure=count)
  if not clauses:
    raise JaxteleError(f"{input_dir}: no clauses found in any .md file")
  token_lists = doc_tok.encode_batch([c.text for c in clauses])
  t_tok = time.time() - t0
  docs = {"train": [], "eval": []}
  for c, ids in zip(clauses, token_lists, strict=True):
    docs["eval" if is_eval(c.id, eval_fraction) else "train"].append((c.id, c.text, ids))
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
           "  " + ", ".join(f"{k}: {s['documents'][k]} docs / {s['tokens'][k]:,} tokens" for k in s["documents"]),
           "  dropped tokens: " + (", ".join(f"{k} {v:,}" for k, v in s["tokens_dropped"].items()) or "none"),
           "  length histogram: " + ", ".join(f"{k}: {v}" for k, v in s["length_histogram"].items()),
           f"  {s['seconds']['total']} s ({total / max(s['seconds']['total'], 1e-9):,.0f} tokens/s)"]
  return "\n".join(lines)
