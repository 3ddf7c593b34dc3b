"""Contamination check: word n-gram overlap between evaluation items and a training corpus.

Text is normalised (NFKC, lowercase, every punctuation character and `_` replaced by a space, whitespace
collapsed) and split into words. The index is a suffix array over the corpus's word ids, ordered by each
position's first `n` words: a corpus of W words costs 8 W bytes (int32 ids + int32 positions) plus the
vocabulary, and any m-gram with m <= n is found exactly (no hash collisions) by binary search. Exactness
for m < n is what makes short items checkable: an item shorter than `n` words counts as one m-gram made of
all its words (m = its length), found if that exact word sequence occurs in the corpus. Documents are
separated by a sentinel id, so no n-gram spans two documents.

`NgramIndex.build(texts, n)` / `.save(path)` / `NgramIndex.load(path)`; `index.overlap(text)` is the
fraction of an item's n-grams found; `flag_items` applies a threshold; `split_metrics` reports a metric
on all items and on the clean ones. `cached_index(paths, cache)` rebuilds only when the corpus files'
digest changes.
"""

import hashlib
import json
import os
import re
import time
import unicodedata
from collections.abc import Iterable

import numpy as np

from jaxtele.errors import JaxteleError

DEFAULT_N = 13
_PUNCT = re.compile(r"[^\w\s]|_")
_SEP = 0  # document separator id; real words get ids >= 1
_END = -1  # past the end of the corpus: sorts before every id, as "end of string" does in a suffix array
FORMAT_VERSION = 1


def normalize(text: str) -> list[str]:
  """The words of `text` after normalisation (see the module docstring)."""
  return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def _rank_by_prefix(ids: np.ndarray, n: int) -> np.ndarray:
  """Dense ranks (>= 1) of every position's first-n-words sequence, by prefix doubling: each round
  joins the rank of the span [i, i+c) with that of [i+s, i+s+c), covering c+s <= n words."""
  rank = ids.astype(np.int64) + 1  # 0 is reserved for "past the end"
  covered = 1
  while covered < n:
    shift = min(covered, n - covered)
    tail = np.zeros_like(rank)
    tail[:-shift] = rank[shift:]
    key = rank * (int(rank.max()) + 1) + tail
    _, inverse = np.unique(key, return_inverse=True)
    rank = inverse.astype(np.int64) + 1
    covered += shift
  return rank


class NgramIndex:
  """An exact index of every word m-gram (m <= n) of a corpus; build once, query many items."""

  def __init__(self, corpus: np.ndarray, order: np.ndarray, vocab: list[str], n: int, digest: str = ""):
    self.corpus, self.order, self.n, self.digest = corpus, order, n, digest
    self.vocab = vocab
    self.word_id = {w: i + 1 for i, w in enumerate(vocab)}
    self._padded = np.concatenate([corpus, np.full(n, _END, np.int32)])

  @classmethod
  def build(cls, texts: Iterable[str], n: int = DEFAULT_N, digest: str = "") -> "NgramIndex":
    if n < 1:
      raise JaxteleError(f"contamination: n must be >= 1, got {n}")
    word_id: dict[str, int] = {}
    chunks = []
    for text in texts:
      words = normalize(text)
      if words:
        chunks.append(np.fromiter((word_id.setdefault(w, len(word_id) + 1) for w in words), np.int32, len(words)))
        chunks.append(np.array([_SEP], np.int32))
    corpus = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    if len(corpus) >= 2**31 - 1:
      raise JaxteleError(f"contamination: corpus of {len(corpus):,} words is too large for an int32 index")
    rank = _rank_by_prefix(corpus, n)
    order = np.argsort(rank, kind="stable").astype(np.int32)
    order = order[corpus[order] != _SEP]  # an n-gram starting at a separator matches nothing
    return cls(corpus, order, list(word_id), n, digest)

  # --- persistence ---

  def save(self, path: str):
    vocab = np.frombuffer("\n".join(self.vocab).encode("utf-8"), np.uint8)
    meta = json.dumps({"n": self.n, "digest": self.digest, "version": FORMAT_VERSION})
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, corpus=self.corpus, order=self.order, vocab=vocab, meta=np.array(meta))
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "NgramIndex":
    if not os.path.isfile(path):
      raise JaxteleError(f"{path}: no such n-gram index file")
    try:
      with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        vocab = z["vocab"].tobytes().decode("utf-8")
        corpus, order = z["corpus"], z["order"]
    except (OSError, KeyError, ValueError) as e:
      raise JaxteleError(f"{path}: not an n-gram index ({type(e).__name__})") from None
    if meta.get("version") != FORMAT_VERSION:
      raise JaxteleError(f"{path}: n-gram index format {meta.get('version')}, expected {FORMAT_VERSION}")
    return cls(corpus, order, vocab.split("\n") if vocab else [], meta["n"], meta["digest"])

  @property
  def nbytes(self) -> int:
    return self.corpus.nbytes + self.order.nbytes + sum(len(w) + 1 for w in self.vocab)

  # --- queries ---

  def grams(self, text: str) -> np.ndarray:
    """[g, m] word ids of an item's n-grams (m = n), or its single m-gram when it has m < n words;
    unknown words get id -2, which matches nothing."""
    ids = np.array([self.word_id.get(w, -2) for w in normalize(text)], np.int32)
    if len(ids) < self.n:
      return ids[None, :]
    return np.lib.stride_tricks.sliding_window_view(ids, self.n)

  def contains(self, grams: np.ndarray) -> np.ndarray:
    """[g] bool: whether each m-gram (rows of one length m <= n) occurs in the corpus."""
    grams = np.asarray(grams, np.int32)
    g, m = grams.shape
    if m == 0 or g == 0:
      return np.zeros(g, bool)
    if m > self.n:
      raise JaxteleError(f"contamination: a {m}-gram is longer than the index's n={self.n}")
    lo, hi = np.zeros(g, np.int64), np.full(g, len(self.order), np.int64)
    offsets = np.arange(m)
    while np.any(lo < hi):  # vectorised lower bound: the first position whose m words are >= the gram
      active = lo < hi
      mid = (lo + hi) // 2
      pos = self.order[np.minimum(mid, len(self.order) - 1)]
      diff = self._padded[pos[:, None] + offsets].astype(np.int64) - grams
      first = np.argmax(diff != 0, axis=1)
      less = diff[np.arange(g), first] < 0
      lo = np.where(active & less, mid + 1, lo)
      hi = np.where(active & ~less, mid, hi)
    found = lo < len(self.order)
    pos = self.order[np.minimum(lo, len(self.order) - 1)]
    return found & np.all(self._padded[pos[:, None] + offsets] == grams, axis=1)

  def overlap(self, text: str) -> float:
    """Fraction of the item's n-grams found in the corpus (0.0 for an item with no words)."""
    grams = self.grams(text)
    return float(self.contains(grams).mean()) if grams.size else 0.0

  def overlaps(self, texts: Iterable[str]) -> list[float]:
    """`overlap` of many items with one search per gram length (much faster than a loop)."""
    per_item = [self.grams(t) for t in texts]
    by_len: dict[int, list[int]] = {}
    for i, grams in enumerate(per_item):
      by_len.setdefault(grams.shape[1], []).append(i)
    out = [0.0] * len(per_item)
    for m, items in by_len.items():
      if m == 0:
        continue
      hits = self.contains(np.concatenate([per_item[i] for i in items]))
      start = 0
      for i in items:
        count = len(per_item[i])
        out[i] = float(hits[start:start + count].mean())
        start += count
    return out


def flag_items(index: NgramIndex, items: Iterable[str], threshold: float = 0.5) -> list[bool]:
  """True for items whose overlap is >= threshold (threshold 0 is refused: it would flag everything)."""
  if not 0 < threshold <= 1:
    raise JaxteleError(f"contamination: threshold must be in (0, 1], got {threshold}")
  return [o >= threshold for o in index.overlaps(items)]


def split_metrics(per_item_scores, flags) -> dict:
  """Mean score over all items and over the clean (unflagged) ones, with their counts."""
  scores, flags = np.asarray(per_item_scores, np.float64), np.asarray(flags, bool)
  if scores.shape != flags.shape:
    raise JaxteleError(f"contamination: {len(scores)} scores but {len(flags)} flags")
  clean = scores[~flags]
  return {"all": float(scores.mean()) if len(scores) else float("nan"), "n_all": int(len(scores)),
          "clean": float(clean.mean()) if len(clean) else float("nan"), "n_clean": int(len(clean)),
          "n_flagged": int(flags.sum())}


# --- corpora on disk ---

def _files(path: str) -> list[str]:
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise JaxteleError(f"{path}: no such corpus file or folder")
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)


def corpus_digest(paths: Iterable[str], extra: str = "") -> str:
  """SHA-256 over every file's relative name and contents (folders recursively), plus `extra`."""
  h = hashlib.sha256(f"{FORMAT_VERSION}|{extra}".encode())
  for path in paths:
    for f in _files(path):
      h.update(os.path.relpath(f, os.path.dirname(os.path.abspath(path))).encode() + b"\0")
      with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
          h.update(block)
  return h.hexdigest()[:32]


def source_texts(specs: Iterable[dict]) -> Iterable[str]:
  """The documents of run-config data sources (`data.sources` entries); SFT records join their fields."""
  from jaxtele.data.sources import make_source

  for j, spec in enumerate(specs):
    src = make_source(spec, where=f"data.sources[{j}]")
    for i in range(len(src)):
      rec = src[i]
      yield rec["text"] if "text" in rec else "\n".join(str(v) for k, v in rec.items() if k != "id")


def cached_index(paths: Iterable[str], cache: str, n: int = DEFAULT_N, texts: Iterable[str] | None = None,
                 log=None) -> NgramIndex:
  """The index of the corpus files under `paths` (or of `texts`, whose digest is still taken over `paths`),
  read from `cache` when it was built from the same files and n, else built and written there."""
  paths = list(paths)
  digest = corpus_digest(paths, extra=f"n={n}")
  if os.path.isfile(cache):
    index = NgramIndex.load(cache)
    if index.digest == digest and index.n == n:
      return index
  tic = time.time()
  if texts is None:
    texts = (open(f, encoding="utf-8", errors="replace").read() for p in paths for f in _files(p))
  index = NgramIndex.build(texts, n, digest)
  os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
  index.save(cache)
  if log:
    log(f"n-gram index: {len(index.corpus):,} words, {index.nbytes / 2**20:.1f} MiB, built in {time.time() - tic:.1f}s")
  return index
