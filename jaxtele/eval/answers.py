"""Open questions: answer perplexity (only the answer's tokens are scored, under the prompt template the model
was trained with) and generated answers scored by token F1 / exact match."""

import numpy as np

from jaxtele.eval import prompts, qa_metrics
from jaxtele.eval.score import sequence_nll
from jaxtele.generation import Sampling, decode_until_stop, generate


def encode(item: dict, template: str, doc_tok, score_end: bool = True):
  """(ids, weights, answer text as scored) the way SFT trains (`jaxtele.data.sft.encode_example`): prompt
  unscored; the answer, continuing the prompt by the rule MCQ options follow (`prompts.continuation`), and with
  `score_end` the token that closes it, scored."""
  tok = doc_tok.tokenizer
  context = prompts.render(template, item["question"], tok)
  prompt = doc_tok.encode(context, bos=True, eos=False).tolist()
  text = prompts.continuation(context, item["answer"])
  answer = doc_tok.encode(text, bos=False, eos=False).tolist()
  end = prompts.end_token(template, tok) if score_end else None
  tail = [end] if end is not None else []
  return prompt + answer + tail, [0] * len(prompt) + [1] * (len(answer) + len(tail)), text


def answer_perplexity(model, doc_tok, items, template: str, batch_size: int = 8, score_end: bool = True,
                      progress=None) -> dict:
  """Token-level: exp(total NLL of scored tokens / their count); also bits per byte of the scored answer text.
  `end_tokens` says how many of the scored tokens are the closing end token (0 without `score_end`)."""
  encoded = [encode(it, template, doc_tok, score_end) for it in items]
  sums, counts = sequence_nll(model, [e[0] for e in encoded], [e[1] for e in encoded], batch_size, progress)
  nbytes = sum(len(e[2].encode("utf-8")) for e in encoded)
  end = prompts.end_token(template, doc_tok.tokenizer) if score_end else None
  loss = float(sums.sum() / counts.sum())
  return {"ppl": float(np.exp(loss)), "loss": loss, "tokens": int(counts.sum()),
          "bpb": float(sums.sum() / np.log(2) / nbytes), "items": len(items), "score_end_token": end is not None,
          "end_tokens": len(items) if end is not None else 0}


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
