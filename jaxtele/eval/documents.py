"""Perplexity scored document by document, for `python -m jaxtele.eval`: every document of a set (or a stated
sample of them), with per-document NLL sums and breakdowns by spec, series and content type.

A document is tokenized as the trainer's pipeline does (`pipeline.Formatter`), cut into the same row-sized
pieces (`packing.split_example`) and packed first-fit; each row slot also carries the index of its
document, so the per-token NLL of the eval step sums back to documents on the host. Attention never
crosses segments, so a piece's NLL does not depend on which row it lands in: the totals equal those of the
trainer's packed set. Bytes are the UTF-8 bytes of a document's scored targets, decoded as a whole
(special tokens count 0). Legend: B batch rows, T row length (seq_len).
"""

import collections
import dataclasses
import hashlib
import re

import jax
import numpy as np

from jaxtele import batch as batch_contract
from jaxtele.data.content import content_type
from jaxtele.data.packing import split_example
from jaxtele.data.pipeline import Formatter
from jaxtele.errors import JaxteleError
from jaxtele.sharding import global_batch

# Clause ids of 3GPP documents ("TS 38.321 5.4.2.1"): the spec is the id's first two words.
SPEC_ID = re.compile(r"^(TS (\d{2})\.(\d)\d{2}(?:-\d+)?)\b")


@dataclasses.dataclass
class Doc:
  id: str
  example: dict  # pre-shifted tokens / targets / loss_mask
  tokens: int  # scored targets
  bytes: int
  spec: str | None
  content: str | None


def spec_of(doc_id: str) -> str | None:
  m = SPEC_ID.match(doc_id)
  return m.group(1) if m else None


def series_of(spec: str | None) -> str | None:
  """'TS 38.101-1' -> '38.1xx' (a spec series and its hundreds: RF, PHY, L2/L3, interfaces)."""
  m = SPEC_ID.match(spec or "")
  return f"{m.group(2)}.{m.group(3)}xx" if m else None


def sampled(doc_id: str, fraction: float) -> bool:
  """A stable, order-free choice of documents (salted apart from the held-out split's hash)."""
  if fraction >= 1:
    return True
  h = int.from_bytes(hashlib.sha256(f"sample:{doc_id}".encode()).digest()[:8], "big")
  return h / 2**64 < fraction


@dataclasses.dataclass
class DocSet:
  """Every document of a set, the ones chosen for scoring, and the rows that hold them."""
  docs: list  # all documents (for the totals in the set)
  scored: list  # indices into docs
  batch_size: int
  seq_len: int
  sample: float

  def batches(self):
    """Dicts of int32 [B, T] under the batch contract, plus `doc` [B, T] (index into docs, -1: nothing)."""
    rows, free = [], []
    for d in self.scored:
      for piece in split_example(self.docs[d].example, self.seq_len):
        n = len(piece["tokens"])
        fits = [i for i, f in enumerate(free) if f >= n]
        if fits:
          r = fits[0]
        else:
          r = len(rows)
          rows.append([])
          free.append(self.seq_len)
        rows[r].append((d, piece))
        free[r] -= n
    for i in range(0, len(rows), self.batch_size):
      yield self._batch(rows[i:i + self.batch_size])

  def _batch(self, rows):
    B, T = self.batch_size, self.seq_len
    out = batch_contract.empty(B, T)
    out["doc"] = np.full((B, T), -1, np.int32)
    for b, pieces in enumerate(rows):
      t = 0
      for seg, (d, piece) in enumerate(pieces, 1):
        n = len(piece["tokens"])
        span = slice(t, t + n)
        out["tokens"][b, span], out["targets"][b, span] = piece["tokens"], piece["targets"]
        out["loss_mask"][b, span] = piece["loss_mask"]
        out["segment_ids"][b, span], out["positions"][b, span] = seg, np.arange(n)
        out["doc"][b, span] = d
        t += n
    return out


def encode(records, fmt: str, doc_tok, template: str = "alpaca") -> list[Doc]:
  """Documents of a set's records (every source, in order)."""
  formatter = Formatter(fmt, doc_tok, template)
  docs = []
  for rec in records:
    ex = formatter(rec)
    mask = ex["loss_mask"] > 0
    text = doc_tok.tokenizer.decode(ex["targets"][mask].tolist(), skip_special_tokens=True)
    doc_id = str(rec.get("id", len(docs)))
    spec = spec_of(doc_id)
    docs.append(Doc(doc_id, ex, int(mask.sum()), len(text.encode("utf-8")), spec,
                    content_type(rec["text"]) if spec and "text" in rec else None))
  return docs


def doc_set(records, fmt, doc_tok, batch_size: int, seq_len: int, sample: float = 1.0, template="alpaca",
            where="perplexity", max_tokens: int = 0) -> DocSet:
  """`max_tokens` > 0 keeps whole documents, in a stable random order (not file order), until that many
  scored tokens are reached (at least one document)."""
  if not 0 < sample <= 1:
    raise JaxteleError(f"{where}.sample: the fraction of documents scored must be in (0, 1], got {sample}")
  docs = encode(records, fmt, doc_tok, template)
  scored = [i for i, d in enumerate(docs) if d.tokens and sampled(d.id, sample)]
  if max_tokens > 0:
    order = sorted(scored, key=lambda i: hashlib.sha256(f"order:{docs[i].id}".encode()).digest())
    kept, total = [], 0
    for i in order:
      if kept and total >= max_tokens:
        break
      kept.append(i)
      total += docs[i].tokens
    scored = sorted(kept)
  if not scored:
    raise JaxteleError(f"{where}: no document to score (sample {sample} of {len(docs)} documents)")
  return DocSet(docs, scored, batch_size, seq_len, sample)


def score(token_nll_step, params, frozen, ds: DocSet, mesh, max_batches: int = 0, progress=None) -> np.ndarray:
  """[len(docs)] summed NLL (nats, float64) of each document's scored tokens; NaN for a document not scored to
  its end (not chosen, or cut by `max_batches`)."""
  if jax.process_count() > 1:
    raise JaxteleError("perplexity: per-document scoring runs in one process")
  nll = np.zeros(len(ds.docs), np.float64)
  counted = np.zeros(len(ds.docs), np.int64)
  for i, batch in enumerate(ds.batches()):
    if max_batches and i >= max_batches:
      break
    nll_BT = np.asarray(token_nll_step(params, frozen, global_batch({k: batch[k] for k in batch_contract.KEYS}, mesh)))
    scored = (batch["loss_mask"] > 0) & (batch["doc"] >= 0)
    nll += np.bincount(batch["doc"][scored], weights=nll_BT[scored].astype(np.float64), minlength=len(nll))
    counted += np.bincount(batch["doc"][scored], minlength=len(nll))
    if progress is not None:
      progress(i + 1)
  nll[counted != np.array([d.tokens for d in ds.docs])] = np.nan
  return nll


def _summary(docs, nll) -> dict:
  tokens, nbytes, total = sum(d.tokens for d in docs), sum(d.bytes for d in docs), float(sum(nll))
  loss = total / max(tokens, 1)
  return {"documents": len(docs), "tokens": tokens, "bytes": nbytes, "nll": total, "loss": loss,
          "ppl": float(np.exp(loss)), "bpb": total / np.log(2) / max(nbytes, 1)}


def results(ds: DocSet, nll: np.ndarray) -> tuple[dict, list[dict]]:
  """(the set's result: totals, fraction scored, breakdowns; one record per scored document).

  A document cut by `max_batches` before its end counts as not scored (its tokens are left out of the totals
  too), so every breakdown sums to the totals."""
  done = [i for i in ds.scored if np.isfinite(nll[i])]
  docs = [ds.docs[i] for i in done]
  vals = [float(nll[i]) for i in done]
  out = _summary(docs, vals)
  out |= {"documents_total": len(ds.docs), "tokens_total": sum(d.tokens for d in ds.docs),
          "bytes_total": sum(d.bytes for d in ds.docs), "sample": ds.sample}
  out["fraction_scored"] = out["tokens"] / max(out["tokens_total"], 1)
  for key, by in (("by_spec", lambda d: d.spec), ("by_series", lambda d: series_of(d.spec)),
                  ("by_content", lambda d: d.content)):
    groups = collections.defaultdict(list)
    for d, v in zip(docs, vals, strict=True):
      if by(d) is not None:
        groups[by(d)].append((d, v))
    if groups:
      out[key] = {g: _summary([d for d, _ in dv], [v for _, v in dv]) for g, dv in sorted(groups.items())}
  records = [{"id": d.id, "nll": v, "tokens": d.tokens, "bytes": d.bytes, "spec": d.spec, "content": d.content}
             for d, v in zip(docs, vals, strict=True)]
  return out, records

