"""Perplexity by document: each document's NLL equals `transformers` scoring that document alone (row-sized
pieces of a long one each alone, as the trainer cuts them), breakdowns sum to the totals, and the fractions
scored match a hand count (byte tokenizer: a document of n ASCII bytes has n scored targets and n - 1 bytes,
its first byte being context only and its end token 0 bytes)."""

import numpy as np
import pytest

from jaxtele.data.tokenize import DocTokenizer
from jaxtele.eval import documents, runner
from jaxtele.sharding import make_mesh

T = 32  # row length: the 75-byte document is cut into 3 pieces
TEXTS = {"TS 38.101-1 5.2": "| band | n1 |\n| --- | --- |\n| n3 | FDD |",
         "TS 38.101-1 6.2": "Transmitter power is defined at the antenna connector.",
         "TS 23.501 4.1": "The 5G system architecture supports data connectivity and services. It is modular.",
         "TS 23.501 5.2": "AMF",
         "notes:1": "Plain general English text without a spec."}


@pytest.fixture(scope="module")
def tiny(make_hf_model, tmp_path_factory):
  from jaxtele.data.byte_tokenizer import byte_tokenizer

  ref = make_hf_model("llama_untied", seed=1, vocab_size=264)
  folder = tmp_path_factory.mktemp("docppl")
  ref.save_pretrained(folder)
  byte_tokenizer().save_pretrained(folder)
  m = runner.load(str(folder))
  return ref, m, DocTokenizer(m.tokenizer, 264)


def hf_nll(ref, ids) -> float:
  """Summed NLL of ids[1:] given the prefix, `transformers` on ids alone."""
  import torch

  with torch.no_grad():
    logits = ref(torch.as_tensor([ids])).logits[0].double()
  logp = torch.log_softmax(logits[:-1], -1)
  return float(-logp[torch.arange(len(ids) - 1), torch.as_tensor(ids[1:])].sum())


def score(m, doc_tok, sample=1.0, max_batches=0):
  records = [{"id": k, "text": v} for k, v in TEXTS.items()]
  ds = documents.doc_set(records, "text", doc_tok, batch_size=8, seq_len=T, sample=sample)
  per_doc = {}
  res = runner.perplexities(m, {"s": (ds, 8, T, max_batches)}, ["s"], make_mesh({"data": -1, "fsdp": 1,
                                                                                  "tensor": 1}),
                            m.tokenizer, True, per_doc)
  return res["s"], per_doc["s"]


def test_per_document_nll_equals_transformers(tiny):
  ref, m, doc_tok = tiny
  res, recs = score(m, doc_tok)
  assert [r["id"] for r in recs] == list(TEXTS)
  for r in recs:
    ids = doc_tok.encode(TEXTS[r["id"]]).tolist()
    want = sum(hf_nll(ref, ids[i:i + T + 1]) for i in range(0, len(ids) - 1, T))  # pieces of T targets
    assert r["nll"] == pytest.approx(want, rel=1e-4), r["id"]
    n = len(TEXTS[r["id"]])
    assert (r["tokens"], r["bytes"]) == (n, n - 1)
    assert r["spec"] == (None if r["id"] == "notes:1" else " ".join(r["id"].split()[:2]))
  assert recs[0]["content"] == "table" and recs[1]["content"] == "prose" and recs[4]["content"] is None
  # totals: every document, hand-counted
  total = sum(len(t) for t in TEXTS.values())
  assert (res["documents"], res["documents_total"], res["tokens"], res["tokens_total"]) == (5, 5, total, total)
  assert res["fraction_scored"] == 1.0 and res["bytes"] == total - 5
  assert res["loss"] == pytest.approx(sum(r["nll"] for r in recs) / total, rel=1e-9)
  assert res["bpb"] == pytest.approx(sum(r["nll"] for r in recs) / np.log(2) / (total - 5), rel=1e-9)
  # breakdowns sum to the totals of the documents they cover (the spec-less one is in none)
  other = {"documents": 1, "tokens": len(TEXTS["notes:1"]), "bytes": len(TEXTS["notes:1"]) - 1,
           "nll": recs[4]["nll"]}
  for key, groups in (("by_spec", {"TS 38.101-1", "TS 23.501"}), ("by_series", {"38.1xx", "23.5xx"}),
                      ("by_content", {"table", "prose"})):
    assert set(res[key]) == groups
    for field, rest in other.items():
      assert sum(g[field] for g in res[key].values()) + rest == pytest.approx(res[field], rel=1e-12), (key, field)

def test_fraction_scored_of_a_sample_and_a_cut(tiny):
  _, m, doc_tok = tiny
  total = sum(len(t) for t in TEXTS.values())
  res, recs = score(m, doc_tok, sample=0.5)
  chosen = [r["id"] for r in recs]
  assert 0 < len(chosen) < 5  # this seed's hash picks some, not all
  assert res["tokens"] == sum(len(TEXTS[i]) for i in chosen) and res["tokens_total"] == total
  assert res["fraction_scored"] == pytest.approx(res["tokens"] / total) and res["sample"] == 0.5
  assert (res["documents"], res["documents_total"]) == (len(chosen), 5)
  # a document that max_batches cut before its end (NaN from `score`) is out of the totals
  ds = documents.doc_set([{"id": k, "text": v} for k, v in TEXTS.items()], "text", doc_tok, 8, T)
  cut, _ = documents.results(ds, np.array([1.0, 2.0, np.nan, 3.0, 4.0]))
  assert (cut["documents"], cut["tokens"], cut["nll"]) == (4, total - len(TEXTS["TS 23.501 4.1"]), 10.0)
  assert cut["fraction_scored"] == pytest.approx(cut["tokens"] / total)
  # a token budget keeps whole documents: one here, the first of a stable order, whole
  one = documents.doc_set([{"id": k, "text": v} for k, v in TEXTS.items()], "text", doc_tok, 8, T, max_tokens=1)
  kept, _ = documents.results(one, np.ones(5))
  assert kept["documents"] == 1 and kept["tokens"] in {len(t) for t in TEXTS.values()}


def test_bad_sets_are_one_line_errors(tmp_path):
  from jaxtele.data.byte_tokenizer import byte_tokenizer
  from jaxtele.data.pipeline import default_config
  from jaxtele.errors import JaxteleError
  from jaxtele.eval import text_sets

  doc_tok = DocTokenizer(byte_tokenizer(), 264)
  (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
  spec = {"name": "s", "sources": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}], "sample": 0.0}
  with pytest.raises(JaxteleError, match=r"^perplexity.sets\[0\].sample: .* \(0, 1\], got 0.0$"):
    text_sets.build_doc_sets([spec], default_config(), 8, doc_tok)
  missing = {"name": "w", "sources": [{"type": "wikitext", "path": str(tmp_path / "none.raw")}]}
  with pytest.raises(JaxteleError, match="none.raw: cannot read the WikiText file"):
    text_sets.build_doc_sets([missing], default_config(), 8, doc_tok)
  # WikiText: one document per ` = Title = ` line (sub-headings ` = = ... = = ` stay inside), text kept whole
  raw = " = A = \n a text .\n = = Sub = = \n more .\n = B = \n b .\n"
  (tmp_path / "w.raw").write_text(raw)
  arts = text_sets.WikiTextArticles(str(tmp_path / "w.raw"))
  assert [r["id"] for r in arts.records] == ["A", "B"] and "".join(r["text"] for r in arts.records) == raw
