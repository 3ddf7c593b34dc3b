"""Open questions: answer perplexity (only the answer's tokens are scored, under the prompt template the model
was trained with) and generated answers scored by token F1 / exact match."""

import numpy as np

from jaxtele.eval import prompts, qa_metrics
from jaxtele.eval.generate import Sampling, decode_until_stop, generate
from jaxtele.eval.score import sequence_nll


def encode(item: dict, template: str, doc_tok, score_end: bool = True):
  """(ids, weights) the way SFT trains (`jaxtele.data.sft.encode_example`): prompt unscored; the answer and,
  with `score_end`, the token that closes it, scored."""
  tok = doc_tok.tokenizer
  prompt = doc_tok.encode(prompts.render(template, item["question"], tok), bos=True, eos=False).tolist()
  answer = doc_tok.encode(item["answer"], bos=False, eos=False).tolist()
  end = prompts.end_token(template, tok) if score_end else None
  tail = [end] if end is not None else []
  return prompt + answer + tail, [0] * len(prompt) + [1] * (len(answer) + len(tail))


def answer_perplexity(model, doc_tok, items, template: str, batch_size: int = 8, score_end: bool = True,
                      progress=None) -> dict:
  """Token-level: exp(total NLL of answer tokens / their count); also bits per byte of the answer text."""
  pairs = [encode(it, template, doc_tok, score_end) for it in items]
  sums, counts = sequence_nll(model, [p[0] for p in pairs], [p[1] for p in pairs], batch_size, progress)
  nbytes = sum(len(it["answer"].encode("utf-8")) for it in items)
  loss = float(sums.sum() / counts.sum())
  return {"ppl": float(np.exp(loss)), "loss": loss, "tokens": int(counts.sum()),
          "bpb": float(sums.sum() / np.log(2) / nbytes), "items": len(items), "score_end_token": score_end}


def generated_answers(model, doc_tok, items, template: str, sampling: Sampling, batch_size: int = 8,
                      progress=None) -> tuple[dict, list]:
  """Generate an answer per question and score it against the references: (summary, per-item records)."""
  tok = doc_tok.tokenizer
  ids = [doc_tok.encode(prompts.render(template, it["question"], tok), bos=True, eos=False) for it in items]
  end = prompts.end_token(template, tok)
  stop_ids = tuple(sorted({i for i in (end, tok.eos_token_id) if i is not None} | set(sampling.stop_ids)))
  sampling = Sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed, stop_ids,
                      sampling.stop_strings)
  outs = generate(model, ids, sampling, tokenizer=tok, batch_size=batch_size, progress=progress)
  texts = [decode_until_stop(tok, o, sampling.stop_strings).strip() for o in outs]
  scores = qa_metrics.score(texts, [it["references"] for it in items])
  records = [{"id": it["id"], "category": it["category"], "prediction": t, "references": it["references"],
              "f1": f, "em": e} for it, t, f, e in zip(items, texts, scores["per_item_f1"], scores["per_item_em"],
                                                         strict=True)]
  return {"f1": scores["f1"], "exact_match": scores["exact_match"], "items": scores["items"]}, records
