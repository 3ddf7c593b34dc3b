"""Multiple choice by log-likelihood, in one of two styles (a choice per set, recorded with its results):

  cloze   each option is scored as the continuation of the question prompt; the prediction is the most likely
          option, raw and normalised by the option's length in UTF-8 bytes
  letter  the options are listed A, B, C... in the prompt and the answer letter is scored, so "All of the
          above" is answerable and an instruct model is asked the way it expects (one forward pass per item
          when every letter is one token)

Accuracy comes with a 95% Wilson interval beside trivial baselines on the same items (chance, always the longest
option, always the shortest, always the one best letter), overall, per category and per source tag, and with how
concentrated the picks are (`most_picked`: a model that answers B to everything scores the share of B answers).
"""

import collections
import math

import numpy as np

from jaxtele.data import sft
from jaxtele.errors import JaxteleError
from jaxtele.eval import prompts
from jaxtele.eval.prompts import continuation
from jaxtele.eval.score import K_MAX, next_token_logprobs, sequence_nll

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
LETTER_TEMPLATE = "Question: {question}\n{options}\nAnswer:"
LETTER_INSTRUCTION = "Answer with the letter of the correct option."
STYLES = ("cloze", "letter")
LETTERS = "ABCDEFGHIJ"[:K_MAX]


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
  """Hits may be fractional (a baseline's expected hit when options tie)."""
  n, k = len(hits), float(sum(hits))
  lo, hi = wilson(k, n)
  return {"accuracy": k / n if n else 0.0, "ci95": [lo, hi], "correct": int(k) if k.is_integer() else k, "items": n}


def listed(options) -> str:
  return "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(options))


def set_style(spec: dict, mcq_cfg, where: str) -> tuple[str, str]:
  """(style, template) of one configured set: its own `style` / `template`, else the task's defaults."""
  style = spec.get("style") or mcq_cfg.style
  if style not in STYLES:
    raise JaxteleError(f"config: {where}.style: unknown style {style!r} (choose from {', '.join(STYLES)})")
  template = spec.get("template") or (mcq_cfg.template if style == "cloze" else mcq_cfg.letter_template)
  key = f"{where}.template" if spec.get("template") else ("mcq.template" if style == "cloze" else "mcq.letter_template")
  prompts.check(template, key)
  if style == "letter" and template not in sft.TEMPLATES and "{options}" not in template:
    raise JaxteleError(f"config: {key}: a letter-choice template needs an {{options}} slot, got {template!r}")
  return style, template


def context(item: dict, template: str, tokenizer, style: str = "cloze") -> str:
  """The prompt an item's options (cloze) or letters (letter) continue. A chat template gets the listed options
  and an instruction in the user's message; a custom template places them at its {options} slot."""
  if style == "letter" and template in sft.TEMPLATES:
    question = f"{item['question']}\n\n{listed(item['options'])}\n\n{LETTER_INSTRUCTION}"
    return prompts.render(template, question, tokenizer)
  return prompts.render(template, item["question"], tokenizer, options=listed(item["options"]))


def option_sequences(items, template: str, doc_tok, style: str = "cloze"):
  """(token lists, weights, (item, option) owners): context tokens unscored, option (or letter) tokens scored."""
  tok = doc_tok.tokenizer
  seqs, weights, owners = [], [], []
  for i, it in enumerate(items):
    ctx = context(it, template, tok, style)
    ctx_ids = doc_tok.encode(ctx, bos=True, eos=False).tolist()
    for j, option in enumerate(it["options"]):
      answer = LETTERS[j] if style == "letter" else option
      opt_ids = tok(continuation(ctx, answer), add_special_tokens=False)["input_ids"]
      seqs.append(ctx_ids + opt_ids)
      weights.append([0] * len(ctx_ids) + [1] * len(opt_ids))
      owners.append((i, j))
  return seqs, weights, owners


def _letter_logliks(model, doc_tok, items, template, batch_size, progress):
  """Letter log-likelihoods: the next-token log-probs of the letters after one pass over each prompt, or (a
  tokenizer that splits a letter) the letters scored as sequences."""
  tok = doc_tok.tokenizer
  ctx_ids, cands = [], []
  for it in items:
    if len(it["options"]) > K_MAX:
      raise JaxteleError(f"{it['id']}: {len(it['options'])} options; the letter style lists at most {K_MAX}")
    ctx = context(it, template, tok, "letter")
    ctx_ids.append(doc_tok.encode(ctx, bos=True, eos=False).tolist())
    cands.append([tok(continuation(ctx, LETTERS[j]), add_special_tokens=False)["input_ids"]
                  for j in range(len(it["options"]))])
  if all(len(c) == 1 for cs in cands for c in cs):
    return next_token_logprobs(model, ctx_ids, [[c[0] for c in cs] for cs in cands], batch_size, progress)
  seqs, weights, owners = option_sequences(items, template, doc_tok, "letter")
  sums, _ = sequence_nll(model, seqs, weights, batch_size, progress)
  out = [np.zeros(len(it["options"])) for it in items]
  for (i, j), s in zip(owners, sums, strict=True):
    out[i][j] = -s
  return out


def baseline_hits(item: dict, pick: str) -> float:
  """1 if the answer is the option `pick` (longest / shortest, in characters) selects; ties split evenly, the
  expected hit of a random tie-break."""
  lengths = [len(o) for o in item["options"]]
  target = max(lengths) if pick == "longest" else min(lengths)
  tied = [j for j, n in enumerate(lengths) if n == target]
  return (item["answer"] in tied) / len(tied)


def fixed_position(items) -> dict:
  """The best accuracy of always answering the same position (A, B, ...), chosen on these items: the most a model
  that ignores the question can score. Carries the position's letter."""
  width = max((len(it["options"]) for it in items), default=0)
  return max((accuracy([float(it["answer"] == j) for it in items]) | {"position": LETTERS[j]} for j in range(width)),
             key=lambda a: a["accuracy"], default=accuracy([]) | {"position": None})


def most_picked(records) -> dict:
  """How concentrated the raw picks are: the position picked most and the fraction of items it was picked for
  (1.0: the same answer whatever the question)."""
  counts = collections.Counter(r["pred"] for r in records)
  if not counts:
    return {"position": None, "fraction": 0.0}
  j, n = counts.most_common(1)[0]
  return {"position": LETTERS[j], "fraction": n / len(records)}


def breakdown(records, items) -> dict:
  """Accuracy (raw, normalised), the baselines on the same items and how spread the raw picks are."""
  return {"raw": accuracy([r["pred"] == r["answer"] for r in records]),
          "norm": accuracy([r["pred_norm"] == r["answer"] for r in records]),
          "baselines": {"chance": accuracy([1 / len(it["options"]) for it in items]),
                        "longest": accuracy([baseline_hits(it, "longest") for it in items]),
                        "shortest": accuracy([baseline_hits(it, "shortest") for it in items]),
                        "fixed_position": fixed_position(items)},
          "most_picked": most_picked(records)}


def evaluate(model, doc_tok, items, template: str = DEFAULT_TEMPLATE, batch_size: int = 8, progress=None,
             style: str = "cloze"):
  """-> (summary, per-item records). `progress(done)` counts options (cloze) or items (letter)."""
  if style == "letter":
    loglik = _letter_logliks(model, doc_tok, items, template, batch_size, progress)
  else:
    seqs, weights, owners = option_sequences(items, template, doc_tok, style)
    sums, _ = sequence_nll(model, seqs, weights, batch_size, progress)
    loglik = [np.zeros(len(it["options"])) for it in items]
    for (i, j), s in zip(owners, sums, strict=True):
      loglik[i][j] = -s
  records = []
  for it, ll in zip(items, loglik, strict=True):
    raw = int(np.argmax(ll))
    if style == "letter":
      norm = raw  # every letter is one symbol: nothing to normalise
    else:
      nbytes = np.asarray([len(continuation("x", o).encode("utf-8")) for o in it["options"]], np.float64)
      norm = int(np.argmax(ll / nbytes))
    records.append({"id": it["id"], "category": it["category"], "tag": it.get("tag", "all"), "answer": it["answer"],
                    "pred": raw, "pred_norm": norm, "loglik": [float(x) for x in ll]})
  summary = {"style": style, **breakdown(records, items), "per_category": {}, "per_tag": {}}
  summary["chance"] = summary["baselines"]["chance"]["accuracy"]
  for field, out in (("category", summary["per_category"]), ("tag", summary["per_tag"])):
    for value in sorted({r[field] for r in records}):
      keep = [k for k, r in enumerate(records) if r[field] == value]
      out[value] = breakdown([records[k] for k in keep], [items[k] for k in keep])
  return summary, records
