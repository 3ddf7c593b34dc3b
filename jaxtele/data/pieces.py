"""Documents cut into row-sized pieces *before* the shuffle, so a long document is spread over the epoch.

Shuffling whole documents and cutting them afterwards puts every piece of a 100k-token table into consecutive
rows: it fills many steps in a row. Here the shuffle permutes pieces. A piece is what packing would have cut
anyway (`packing.split_example`: pairs [k L, (k + 1) L) of a document's next-token pairs), so the packed rows
hold the same pieces, only in another order.

Building the index is one pass over this process's shard at start. A `text` source is tokenized once and its
ids are held in memory (4 bytes per token); the steps slice them instead of tokenizing again. A `tokens` source
is read (its ids are validated then) and holds in memory only the documents of more than one piece, so a piece
of a long document never re-reads the whole record; one-piece documents are read when drawn.
"""

import numpy as np

from jaxtele.data.packing import lm_example

TOKENIZE_CHUNK = 256  # documents per batched tokenizer call


class DocumentPieces:
  """Random-access source of pre-shifted LM examples, each at most `seq_len` pairs, over every document of
  `records` (a sized, indexable shard) formatted by `fmt` (a `pipeline.Formatter` of format text or tokens)."""

  def __init__(self, records, fmt, seq_len: int):
    self.records, self.fmt, self.seq_len = records, fmt, seq_len
    n = len(records)
    if fmt.fmt == "text":
      ids, lengths = [], []
      for a in range(0, n, TOKENIZE_CHUNK):
        batch = fmt.doc_tok.encode_batch([records[i]["text"] for i in range(a, min(a + TOKENIZE_CHUNK, n))])
        ids += batch
        lengths += [len(x) for x in batch]
      self.ids = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
      self.held = np.ones(n, bool)
    else:
      ids, lengths = [], []
      for i in range(n):
        ex = fmt(records[i])
        lengths.append(len(ex["tokens"]) + 1)
        if len(ex["tokens"]) > seq_len:  # held: a long document is drawn once per piece
          ids.append(np.concatenate([ex["tokens"], ex["targets"][-1:]]))
        else:
          ids.append(np.zeros(0, np.int32))
      self.held = np.asarray([len(x) > 0 for x in ids])
      self.ids = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
    lengths_N = np.asarray(lengths, np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(np.where(self.held, lengths_N, 0))])  # into self.ids
    pairs_N = np.maximum(lengths_N - 1, 0)  # a 1-token document has no pair and no piece
    pieces_N = -(-pairs_N // seq_len)
    self.doc_P = np.repeat(np.arange(n), pieces_N)
    first_P = np.repeat(np.cumsum(pieces_N) - pieces_N, pieces_N)
    self.start_P = (np.arange(len(self.doc_P)) - first_P) * seq_len

  def __len__(self):
    return len(self.doc_P)

  def __getitem__(self, i):
    d, start = int(self.doc_P[i]), int(self.start_P[i])
    if self.held[d]:
      doc = self.ids[self.offsets[d]:self.offsets[d + 1]]
      return lm_example(doc[start:start + self.seq_len + 1])
    ex = self.fmt(self.records[d])
    return {k: v[start:start + self.seq_len] for k, v in ex.items()}

  def document(self, i) -> int:
    """Index (in the shard) of the document piece `i` comes from."""
    return int(self.doc_P[i])
