"""Contamination check: n-gram overlap of eval items with a training corpus.

References are independent: a brute-force Python set of every m-gram for the exact index, and text
copied by hand from the corpus (or from a 3GPP spec, checked with grep) for the flags.
"""

import json
import os
import random

import pytest

from jaxtele.errors import JaxteleError
from jaxtele.eval.contamination import (NgramIndex, cached_index, flag_items, normalize, source_texts,
                                        split_metrics)

CORPUS = [
    "The gNB-DU hosts the RLC, MAC and PHY layers; its operation is partly controlled by the gNB-CU. "
    "One gNB-DU supports one or multiple cells, and one cell is supported by only one gNB-DU.",
    "Paging allows the network to reach UEs in RRC_IDLE and in RRC_INACTIVE state through paging messages, "
    "and to notify UEs in RRC_IDLE, RRC_INACTIVE and RRC_CONNECTED state of system information change.",
]
COPIED = ("Paging allows the network to reach UEs in RRC_IDLE and in RRC_INACTIVE state through paging messages, "
          "and to notify UEs")
NEAR_COPY = ("PAGING allows the network -- to reach UEs in rrc idle, and in RRC-INACTIVE state through paging "
             "messages and to notify  UEs!")
FRESH = ("A recipe for bread needs flour, water, salt and yeast, kneaded for ten minutes and left to rise "
         "for an hour before baking in a hot oven.")


@pytest.fixture(scope="module")
def index():
  return NgramIndex.build(CORPUS, n=13)


def test_normalize_strips_punctuation_case_and_spacing():
  assert normalize("  The gNB-DU's  RLC_MAC,\tPHY!  ") == ["the", "gnb", "du", "s", "rlc", "mac", "phy"]


def test_copied_item_flagged_fresh_not(index):
  assert index.overlap(COPIED) == 1.0
  assert index.overlap(FRESH) == 0.0
  assert flag_items(index, [COPIED, FRESH], threshold=0.5) == [True, False]


def test_near_copy_with_changed_punctuation_and_case_flagged(index):
  assert index.overlap(NEAR_COPY) == 1.0
  # a changed last word breaks the one 13-gram that contains it, and only that one
  words = normalize(NEAR_COPY)
  words[-1] = "banana"
  grams = len(words) - 12
  assert grams > 3 and index.overlap(" ".join(words)) == pytest.approx((grams - 1) / grams)


def test_items_shorter_than_n_are_one_gram(index):
  assert index.overlap("one gNB-DU supports one or multiple cells") == 1.0  # 7 words, in the corpus
  assert index.overlap("one gNB-DU supports many cells") == 0.0
  assert index.overlap("") == 0.0


def test_n_grams_do_not_cross_documents(index):
  tail_and_head = "supported by only one gNB-DU Paging allows the network"
  assert index.overlap(tail_and_head) == 0.0


def test_exact_against_brute_force_sets():
  rng = random.Random(0)
  words = "a b c d e".split()
  docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(25)]
  n = 4
  idx = NgramIndex.build(docs, n=n)
  grams = set()
  for d in docs:
    w = d.split()
    grams |= {tuple(w[i:i + m]) for m in range(1, n + 1) for i in range(len(w) - m + 1)}
  queries = [tuple(rng.choice(words + ["z"]) for _ in range(rng.randint(1, n))) for _ in range(500)]
  got = idx.overlaps([" ".join(q) for q in queries])
  assert [g == 1.0 for g in got] == [q in grams for q in queries]
  assert sum(got) > 50  # the check sees both outcomes


def test_save_load_round_trip(index, tmp_path):
  path = str(tmp_path / "idx.npz")
  index.save(path)
  loaded = NgramIndex.load(path)
  assert loaded.n == index.n and loaded.vocab == index.vocab
  items = [COPIED, NEAR_COPY, FRESH, "one gNB-DU supports one or multiple cells"]
  assert loaded.overlaps(items) == [index.overlap(t) for t in items] == [1.0, 1.0, 0.0, 1.0]


def test_cached_index_rebuilds_only_when_corpus_changes(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.md").write_text(CORPUS[0])
  cache = str(tmp_path / "cache" / "idx.npz")
  first = cached_index([str(corpus)], cache, n=5)
  stamp = os.stat(cache).st_mtime_ns
  assert cached_index([str(corpus)], cache, n=5).digest == first.digest and os.stat(cache).st_mtime_ns == stamp
  (corpus / "b.md").write_text(CORPUS[1])
  second = cached_index([str(corpus)], cache, n=5)
  assert second.digest != first.digest and second.overlap(COPIED) == 1.0 and first.overlap(COPIED) == 0.0


def test_bad_inputs_raise(tmp_path, index):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not numpy")
  with pytest.raises(JaxteleError, match="bad.npz"):
    NgramIndex.load(str(bad))
  with pytest.raises(JaxteleError, match="threshold"):
    flag_items(index, [COPIED], threshold=0.0)
  with pytest.raises(JaxteleError, match="scores"):
    split_metrics([1.0, 0.0], [True])


def test_split_metrics():
  m = split_metrics([1.0, 0.0, 1.0, 0.5], [True, False, False, True])
  assert m == {"all": 0.625, "n_all": 4, "clean": 0.5, "n_clean": 2, "n_flagged": 2}


def test_source_texts_from_run_config_sources(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
  idx = NgramIndex.build(source_texts([{"type": "jsonl", "path": str(path)}]))
  assert idx.overlap(COPIED) == 1.0 and idx.overlap(FRESH) == 0.0


def test_teleqna_against_two_real_specs(shared_data):
  """A few TeleQnA questions against TS 38.300 and TS 23.501. The two flagged ones were checked by hand:
  38.300 says "Cell search is the procedure by which a UE acquires time and frequency synchronization with
  a cell and detects the Cell ID of that cell", 23.501 "During times of severe congestion when it is
  necessary to drop packets on a media QoS Flow". Over all 10,000 questions and the whole 3GPP folder,
  3 score >= 0.5 (all "Standards specifications"), 20 have any 13-gram overlap."""
  specs = [os.path.join(shared_data, "3gpp", f) for f in ("38.300_NG-RAN_Overall_j20.md",
                                                          "23.501_5GS_Architecture_j70.md")]
  idx = NgramIndex.build(open(p, encoding="utf-8").read() for p in specs)
  qna = json.load(open(os.path.join(shared_data, "teleqna", "TeleQnA.json"), encoding="utf-8"))
  questions = [q["question"] for q in qna.values()]
  copied = [q for q in questions if q.startswith(("What is the procedure called by which a UE acquires time",
                                                  "What happens during times of severe congestion when it"))]
  research = [q["question"] for q in qna.values() if q["category"] == "Research publications"][:50]
  assert len(copied) == 2
  assert flag_items(idx, copied, threshold=0.5) == [True, True]
  assert sum(flag_items(idx, research, threshold=0.5)) == 0
