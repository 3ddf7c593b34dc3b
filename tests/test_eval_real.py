"""The real SmolLM2 against `transformers` on jaxtele's own HF export: perplexity (windows and packed sets, bits
per byte), answer perplexity with the prompt masked, and multiple-choice option log-likelihoods on TeleQnA."""

import json

import numpy as np
import pytest
import torch

from jaxtele.data.tokenize import DocTokenizer
from jaxtele.eval import answers, items, mcq

pytestmark = pytest.mark.slow

TEXT = ("The Access and Mobility Management Function (AMF) terminates the N2 interface of the radio access network "
        "and the N1 NAS signalling of the UE. It performs registration management, connection management, "
        "reachability management and mobility management, and it supports lawful interception.")


def hf_nll(ref, ids) -> np.ndarray:
  """Per-target NLL (nats) of ids[1:] given the prefix, from `transformers` in fp32."""
  with torch.no_grad():
    logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
  return -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


def test_perplexity_matches_transformers(smollm2, smollm2_hf, window_perplexity):
  _, ref = smollm2_hf
  ids = smollm2.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
  window = 16
  n = (len(ids) - 1) // window
  ours = window_perplexity(smollm2.model, ids, window, n)
  nll = np.concatenate([hf_nll(ref, ids[i * window:(i + 1) * window + 1]) for i in range(n)])
  want = float(np.exp(nll.mean()))
  assert abs(ours / want - 1) < 1e-3, (ours, want)


def test_packed_set_perplexity_and_bits_per_byte_match_transformers(smollm2, smollm2_hf, tmp_path):
  """The trainer's path (`evaluate` over a packed set) on one document: loss and bits per byte."""
  import jax

  from jaxtele.data.pipeline import default_config
  from jaxtele.eval.runner import load, perplexities
  from jaxtele.eval.text_sets import build_sets
  from jaxtele.sharding import make_mesh

  folder, ref = smollm2_hf
  (tmp_path / "doc.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
  m = load(folder)
  tok = m.tokenizer
  doc_tok = DocTokenizer(tok, m.model.config.vocab_size)
  dcfg = default_config()
  dcfg.seq_len = 64
  sets = build_sets([{"name": "doc", "sources": [{"type": "jsonl", "path": str(tmp_path / "doc.jsonl")}]}], dcfg, 8,
                    doc_tok)
  mesh = make_mesh({"data": -1}, jax.devices()[:1])
  got = perplexities(m, {"doc": (sets["doc"], 8, 64, 0)}, ["doc"], mesh, tok, True)["doc"]
  # Reference: the document + <|endoftext|>, cut into rows of 64 targets (packing splits long documents).
  ids = tok(TEXT, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|endoftext|>")]
  nll = np.concatenate([hf_nll(ref, ids[i:i + 65]) for i in range(0, len(ids) - 1, 64)])
  assert got["tokens"] == len(ids) - 1
  assert abs(got["ppl"] / np.exp(nll.mean()) - 1) < 1e-3
  scored_text = TEXT[len(tok.decode(ids[:1])):]  # every target is scored: all but the first token, EOS 0 bytes
  want_bpb = nll.sum() / np.log(2) / len(scored_text.encode("utf-8"))
  assert abs(got["bpb"] / want_bpb - 1) < 1e-3, (got["bpb"], want_bpb)


def test_answer_perplexity_matches_transformers_with_prompt_masked(smollm2, smollm2_hf):
  _, ref = smollm2_hf
  tok = smollm2.tokenizer
  doc_tok = DocTokenizer(tok, smollm2.model.config.vocab_size)
  qa = [{"question": "What does AMF stand for?", "answer": "Access and Mobility Management Function"},
        {"question": "Which function allocates UE IP addresses in 5G?", "answer": "The SMF."},
        {"question": "Name the 5G user plane function.", "answer": "UPF"}]
  got = answers.answer_perplexity(smollm2.model, doc_tok, qa, "chatml", batch_size=2)
  total, count = 0.0, 0
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  for it in qa:
    prompt = tok(f"<|im_start|>user\n{it['question']}<|im_end|>\n<|im_start|>assistant\n",
                 add_special_tokens=False)["input_ids"]
    answer = tok(it["answer"], add_special_tokens=False)["input_ids"] + [im_end]
    nll = hf_nll(ref, prompt + answer)[len(prompt) - 1:]  # targets of the answer tokens only
    total, count = total + nll.sum(), count + len(answer)
  assert got["tokens"] == count
  assert abs(got["ppl"] / np.exp(total / count) - 1) < 1e-3, (got["ppl"], np.exp(total / count))


def test_mcq_loglik_on_teleqna_matches_transformers(smollm2, smollm2_hf, shared_data):
  _, ref = smollm2_hf
  tok = smollm2.tokenizer
  doc_tok = DocTokenizer(tok, smollm2.model.config.vocab_size)
  its = items.load_items({"path": f"{shared_data}/teleqna/TeleQnA.json", "categories": list(items.STANDARDS),
                          "limit": 3, "seed": 0}, "mcq", "t")
  summary, records = mcq.evaluate(smollm2.model, doc_tok, its, batch_size=4)
  worst = 0.0
  for it, rec in zip(its, records, strict=True):
    ctx = tok(f"Question: {it['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
    want = []
    for o in it["options"]:
      opt = tok(" " + o, add_special_tokens=False)["input_ids"]
      want.append(-hf_nll(ref, ctx + opt)[len(ctx) - 1:].sum())
    worst = max(worst, float(np.max(np.abs(np.asarray(rec["loglik"]) - want) / np.abs(want))))
    assert rec["pred"] == int(np.argmax(want))
  assert worst < 1e-3, worst
  assert summary["raw"]["items"] == 3


def test_answer_continues_a_custom_prompt_with_a_space_as_transformers_scores_it(smollm2, smollm2_hf):
  """A template ending in a non-space: the answer is scored as prompt + " " + answer tokenised as one text by the
  exported tokenizer (what `transformers` users score), plus EOS; the label counts the end tokens."""
  import transformers

  folder, ref = smollm2_hf
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  doc_tok = DocTokenizer(smollm2.tokenizer, smollm2.model.config.vocab_size)
  template = "Question: {question}\nAnswer:"
  qa = [{"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "What does AMF stand for?", "answer": "Access and Mobility Management Function"}]
  got = answers.answer_perplexity(smollm2.model, doc_tok, qa, template, batch_size=2)
  total, count, nbytes = 0.0, 0, 0
  for it in qa:
    prompt = template.format(question=it["question"])
    head = [doc_tok.bos_id] if doc_tok.bos_id is not None else []
    p_ids = head + hf_tok(prompt, add_special_tokens=False)["input_ids"]
    ids = head + hf_tok(prompt + " " + it["answer"], add_special_tokens=False)["input_ids"] + [hf_tok.eos_token_id]
    assert ids[:len(p_ids)] == p_ids
    nll = hf_nll(ref, ids)[len(p_ids) - 1:]
    total, count, nbytes = total + nll.sum(), count + len(ids) - len(p_ids), nbytes + len(" " + it["answer"])
  assert got["tokens"] == count and got["end_tokens"] == len(qa) and got["score_end_token"]
  assert abs(got["ppl"] / np.exp(total / count) - 1) < 1e-3, (got["ppl"], np.exp(total / count))
  assert abs(got["bpb"] / (total / np.log(2) / nbytes) - 1) < 1e-3
  bare = answers.answer_perplexity(smollm2.model, doc_tok, qa, template, batch_size=2, score_end=False)
  assert bare["tokens"] == count - len(qa) and bare["end_tokens"] == 0 and not bare["score_end_token"]


def test_letter_choice_matches_transformers_next_letter(smollm2, smollm2_hf, shared_data):
  """Options listed A-E, the letter scored: `transformers`' next-token log-probs of " A".." E" after a prompt
  ending in "Answer:", of "A".."E" after ChatML's "assistant\\n" (the one continuation rule)."""
  import transformers

  folder, ref = smollm2_hf
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  doc_tok = DocTokenizer(smollm2.tokenizer, smollm2.model.config.vocab_size)
  pool = items.load_items({"path": f"{shared_data}/teleqna/TeleQnA.json", "categories": list(items.STANDARDS)},
                          "mcq", "t")
  above = [it for it in pool if it["options"][it["answer"]].lower().startswith("all of the above")]
  its = above[:2] + pool[:1]
  for template, it, rec in letter_records(smollm2.model, doc_tok, its):
    listed = "\n".join(f"{'ABCDE'[j]}. {o}" for j, o in enumerate(it["options"]))
    if template == "chatml":
      user = f"{it['question']}\n\n{listed}\n\nAnswer with the letter of the correct option."
      prompt, space = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", ""
    else:
      prompt, space = f"Question: {it['question']}\n{listed}\nAnswer:", " "
    ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    letters = [hf_tok(space + "ABCDE"[j], add_special_tokens=False)["input_ids"] for j in range(len(it["options"]))]
    assert all(len(x) == 1 for x in letters)
    with torch.no_grad():
      logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
    want = logp[[x[0] for x in letters]]
    np.testing.assert_allclose(rec["loglik"], want, rtol=1e-3)
    assert rec["pred"] == int(np.argmax(want))


def letter_records(model, doc_tok, its):
  for template in (mcq.LETTER_TEMPLATE, "chatml"):
    summary, records = mcq.evaluate(model, doc_tok, its, template, batch_size=4, style="letter")
    assert summary["style"] == "letter" and summary["raw"]["items"] == len(its)
    yield from ((template, it, rec) for it, rec in zip(its, records, strict=True))
