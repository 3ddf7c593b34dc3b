"""Multiple choice by option log-likelihood: each option is scored as the continuation of the question prompt;
the prediction is the most likely option, raw and normalised by the option's length in UTF-8 bytes.
Accuracy comes with a 95% Wilson interval, overall and per category."""

import math

import numpy as np

from jaxtele.eval import prompts
from jaxtele.eval.prompts import continuation
from jaxtele.eval.score import sequence_nll

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
LETTERS = "ABCDEFGHIJ"


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion (well-behaved at 0, 1 and small n)."""
  if n == 0:
    return 0.0, 1.0
  p = correct / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def accuracy(hits) -> dict:
  n, k = len(hits), int(sum(hits))
  lo, hi = wilson(k, n)
  return {"accuracy": k / n if n else 0.0, "ci95": [lo, hi], "correct": k, "items": n}


def option_sequences(items, template: str, doc_tok):
  """(token lists, weights, (item, option) owners): context tokens unscored, option tokens scored."""
  tok = doc_tok.tokenizer
  seqs, weights, owners = [], [], []
  for i, it in enumerate(items):
    listed = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(it["options"]))
    context = prompts.render(template, it["question"], tok, options=listed)
    ctx_ids = doc_tok.encode(context, bos=True, eos=False).tolist()
    for j, option in enumerate(it["options"]):
      opt_ids = tok(continuation(context, option), add_special_tokens=False)["input_ids"]
      seqs.append(ctx_ids + opt_ids)
      weights.append([0] * len(ctx_ids) + [1] * len(opt_ids))
      owners.append((i, j))
  return seqs, weights, owners


def evaluate(model, doc_tok, items, template: str = DEFAULT_TEMPLATE, batch_size: int = 8, progress=None):
  """-> (summary, per-item records)."""
  seqs, weights, owners = option_sequences(items, template, doc_tok)
  sums, _ = sequence_nll(model, seqs, weights, batch_size, progress)
  loglik = [np.zeros(len(it["options"])) for it in items]
  for (i, j), s in zip(owners, sums, strict=True):
    loglik[i][j] = -s
  records = []
  for it, ll in zip(items, loglik, strict=True):
    nbytes = np.asarray([len(continuation("x", o).encode("utf-8")) for o in it["options"]], np.float64)
    raw, norm = int(np.argmax(ll)), int(np.argmax(ll / nbytes))
    records.append({"id": it["id"], "category": it["category"], "answer": it["answer"], "pred": raw,
                    "pred_norm": norm, "loglik": [float(x) for x in ll]})
  summary = {"raw": accuracy([r["pred"] == r["answer"] for r in records]),
             "norm": accuracy([r["pred_norm"] == r["answer"] for r in records]),
             "chance": float(np.mean([1 / len(it["options"]) for it in items])), "per_category": {}}
  for cat in sorted({r["category"] for r in records}):
    rs = [r for r in records if r["category"] == cat]
    summary["per_category"][cat] = {"raw": accuracy([r["pred"] == r["answer"] for r in rs]),
                                    "norm": accuracy([r["pred_norm"] == r["answer"] for r in rs])}
  return summary, records
