"""A training stream that mixes documents: long documents are cut into row-sized pieces before the shuffle."""

import json

import numpy as np
import pytest

from jaxtele.data import pipeline
from jaxtele.data.byte_tokenizer import byte_tokenizer
from jaxtele.data.tokenize import DocTokenizer

SEQ, BATCH, GIANT_PIECES, SMALL_DOCS, SMALL_LEN = 64, 8, 40, 300, 60


@pytest.fixture(scope="module")
def giant_corpus(tmp_path_factory):
  """One document of 40 rows' worth of pairs and 300 of 60 tokens; every token of document d is 1000 + d."""
  path = tmp_path_factory.mktemp("giant") / "docs.jsonl"
  lengths = [GIANT_PIECES * SEQ + 1] + [SMALL_LEN] * SMALL_DOCS
  with open(path, "w") as f:
    for d, n in enumerate(lengths):
      f.write(json.dumps({"tokens": [1000 + d] * n}) + "\n")
  return str(path), lengths


@pytest.fixture(scope="module")
def doc_tok():
  return DocTokenizer(byte_tokenizer(), vocab_size=2000)


def epoch(path, doc_tok, split, fmt="tokens", field="tokens"):
  cfg = pipeline.default_config()
  cfg.sources = [{"type": "jsonl", "path": path, "fields": [field]} if fmt == "tokens" else
                 {"type": "jsonl", "path": path}]
  cfg.update(format=fmt, seq_len=SEQ, batch_size=BATCH, num_epochs=1, split_before_shuffle=split)
  return list(pipeline.build(cfg, doc_tok))


def rows_per_document(batch) -> list[int]:
  """For each document in the batch, how many of its rows hold some of it."""
  owners = [set(np.unique(row[seg != 0]).tolist()) for row, seg in zip(batch["tokens"], batch["segment_ids"])]
  docs = set().union(*owners)
  return [sum(d in o for o in owners) for d in docs]


def test_a_giant_document_no_longer_fills_whole_steps(giant_corpus, doc_tok):
  path, lengths = giant_corpus
  off, on = epoch(path, doc_tok, split=False), epoch(path, doc_tok, split=True)
  # Shuffled whole, the giant document's 40 rows come one after another: several steps hold nothing else.
  assert max(max(rows_per_document(b)) for b in off) == BATCH
  assert sum(len(rows_per_document(b)) == 1 for b in off) >= GIANT_PIECES // BATCH - 1
  # Cut first, its pieces are spread over the epoch (40 of ~340 rows): no step is more than half one document.
  assert max(max(rows_per_document(b)) for b in on) <= BATCH // 2
  assert np.mean([len(rows_per_document(b)) for b in on]) >= 6.5
  # The same tokens either way: document d gives len(d) - 1 input tokens (hand count), less what the dropped
  # last partial batch held.
  for batches in (off, on):
    tokens = np.concatenate([b["tokens"][b["segment_ids"] != 0] for b in batches])
    counts = np.bincount(tokens - 1000, minlength=len(lengths))
    assert np.all(counts <= np.asarray(lengths) - 1) and counts.sum() >= sum(lengths) - len(lengths) - BATCH * SEQ
    trained = np.concatenate([b["targets"][b["loss_mask"] == 1] for b in batches])
    assert np.array_equal(np.sort(trained), np.sort(tokens)), "a target never crosses into another document"


def test_text_pieces_are_the_tokenizer_ids_cut_at_rows(tmp_path, doc_tok):
  """The text path tokenizes once at start: its pieces are the HF tokenizer's ids + EOS, cut every SEQ pairs."""
  from jaxtele.data.pieces import DocumentPieces

  texts = ["gNB " * 70, "short one", "x"]
  path = tmp_path / "t.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  src = pipeline.open_sources(_cfg(str(path)))[0][0]
  pieces = DocumentPieces(src, pipeline.Formatter("text", doc_tok, "alpaca"), SEQ)
  tok = doc_tok.tokenizer
  want = []
  for t in texts:
    ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|endoftext|>")]
    want += [ids[i:i + SEQ + 1] for i in range(0, len(ids) - 1, SEQ)]
  got = [pieces[i]["tokens"].tolist() + pieces[i]["targets"][-1:].tolist() for i in range(len(pieces))]
  assert got == want and [pieces.document(i) for i in range(len(pieces))] == [0] * (len(want) - 2) + [1, 2]


def _cfg(path, **source):
  cfg = pipeline.default_config()
  cfg.sources = [{"type": "jsonl", "path": path, **source}]
  return cfg


def test_token_pieces_are_the_record_cut_at_rows(tmp_path, doc_tok):
  """Long records (held in memory) and short ones (read when drawn) give the ids cut every SEQ pairs, in order."""
  from jaxtele.data.pieces import DocumentPieces

  docs = [list(range(1, 2 * SEQ + 11)), list(range(100, 140)), [7]]
  path = tmp_path / "k.jsonl"
  path.write_text("".join(json.dumps({"tokens": d}) + "\n" for d in docs))
  src = pipeline.open_sources(_cfg(str(path), fields=["tokens"]))[0][0]
  pieces = DocumentPieces(src, pipeline.Formatter("tokens", doc_tok, "alpaca"), SEQ)
  want = [docs[0][:SEQ + 1], docs[0][SEQ:2 * SEQ + 1], docs[0][2 * SEQ:], docs[1]]  # [7] has no pair
  got = [pieces[i]["tokens"].tolist() + pieces[i]["targets"][-1:].tolist() for i in range(len(pieces))]
  assert got == want and pieces.held.tolist() == [True, False, False]
