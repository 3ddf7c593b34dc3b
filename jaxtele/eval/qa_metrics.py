"""Token F1 and exact match with SQuAD's answer normalisation, averaged per item (best over references)."""

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
  """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
  text = "".join(c for c in text.lower() if c not in _PUNCT)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
  """F1 of the bags of normalised words; two empty answers agree (1.0), one empty answer scores 0."""
  pred, ref = normalize(prediction).split(), normalize(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], references: list[list[str]]) -> dict:
  """Mean over items of the best F1 / EM against any of an item's references."""
  f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)]
  em = [max(exact_match(p, r) for r in refs) for p, refs in zip(predictions, references, strict=True)]
  n = max(len(f1), 1)
  return {"f1": sum(f1) / n, "exact_match": sum(em) / n, "items": len(f1), "per_item_f1": f1, "per_item_em": em}
