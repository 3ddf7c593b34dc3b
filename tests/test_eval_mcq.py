"""Multiple-choice baselines (hand-computed), the 3GPP / IEEE / other tagger on hand-labelled TeleQnA items, and
the per-set style choice; letter-choice scores against `transformers` are in test_eval_real.py."""

import json

import ml_collections
import pytest

from jaxtele.errors import JaxteleError
from jaxtele.eval import items, mcq


def test_baselines_on_the_same_items_by_hand():
  its = [{"options": ["a", "bbbb", "cc"], "answer": 1},  # longest right, shortest wrong
         {"options": ["xx", "y", "zz", "w"], "answer": 0},  # longest tied 2 ways: 1/2; shortest tied 2 ways: 0
         {"options": ["p", "qq"], "answer": 0},  # longest wrong, shortest right
         {"options": ["aaa", "bbb"], "answer": 1}]  # both tied: 1/2 each
  records = [{"pred": 1, "pred_norm": 1, "answer": 1}, {"pred": 1, "pred_norm": 0, "answer": 0},
             {"pred": 0, "pred_norm": 1, "answer": 0}, {"pred": 0, "pred_norm": 0, "answer": 1}]
  b = mcq.breakdown(records, its)
  assert b["raw"]["accuracy"] == 2 / 4 and b["norm"]["accuracy"] == 2 / 4
  assert b["baselines"]["chance"]["accuracy"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2 + 1 / 2) / 4)
  assert b["baselines"]["longest"]["accuracy"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
  assert b["baselines"]["shortest"]["accuracy"] == pytest.approx((0 + 0 + 1 + 0.5) / 4)
  assert b["baselines"]["longest"]["ci95"] == pytest.approx(list(mcq.wilson(2, 4)))
  # Answers by position: B, A, A, B -> always A (or B) hits 2 of 4; the raw picks B, B, A, A: half each.
  assert b["baselines"]["fixed_position"]["position"] == "A"
  assert b["baselines"]["fixed_position"]["accuracy"] == 2 / 4
  assert b["most_picked"]["fraction"] == 2 / 4
  lopsided = mcq.breakdown(records[:3], its[:3])  # answers B, A, A: always A hits 2 of 3; picks B, B, A
  assert lopsided["baselines"]["fixed_position"] | {"ci95": None} == {
      "position": "A", "accuracy": 2 / 3, "correct": 2, "items": 3, "ci95": None}
  assert lopsided["most_picked"] == {"position": "B", "fraction": 2 / 3}


def test_a_model_that_gives_one_answer_scores_the_fixed_letter_baseline_and_is_shown_as_such():
  """Every pick C: the raw accuracy is the share of C answers, exactly the fixed-letter baseline for C, and the
  results page says C was picked for 100% of the items."""
  from jaxtele.eval.results_page import markdown

  answers = [2, 0, 2, 1, 2, 3, 2, 0]
  its = [{"options": ["w", "x", "y", "z"], "answer": a} for a in answers]
  records = [{"pred": 2, "pred_norm": 2, "answer": a} for a in answers]
  b = mcq.breakdown(records, its)
  assert b["raw"]["accuracy"] == b["baselines"]["fixed_position"]["accuracy"] == 4 / 8
  assert b["most_picked"] == {"position": "C", "fraction": 1.0}
  page = markdown({"model": {"source": "m", "kind": "hf"}, "seconds": 1.0,
                   "mcq": {"s": {"style": "letter", **b, "per_category": {}}}})
  assert "| C: 0.500 [" in page and "| C for 100% |" in page


# Hand-labelled from reading each question and its explanation: which body's standard it is about.
HAND = {"question 1810": "3GPP", "question 834": "IEEE", "question 2904": "IEEE", "question 7780": "3GPP",
        "question 2983": "other", "question 7945": "3GPP", "question 7391": "3GPP", "question 8120": "other",
        "question 6315": "3GPP", "question 6290": "other", "question 2955": "other", "question 9655": "3GPP",
        "question 4219": "other", "question 1860": "3GPP", "question 624": "other", "question 897": "3GPP",
        "question 1081": "3GPP", "question 5059": "other", "question 7832": "3GPP", "question 759": "other",
        "question 6921": "other", "question 5833": "3GPP", "question 3039": "3GPP", "question 1068": "3GPP",
        "question 783": "3GPP", "question 8465": "other", "question 785": "3GPP", "question 7797": "3GPP",
        "question 6452": "3GPP", "question 5246": "3GPP"}


def test_source_tag_agrees_with_hand_labels_on_teleqna(shared_data):
  raw = json.load(open(f"{shared_data}/teleqna/TeleQnA.json"))
  got = {k: items.source_tag(raw[k]["question"], raw[k]["explanation"]) for k in HAND}
  wrong = {k: (got[k], HAND[k]) for k in HAND if got[k] != HAND[k]}
  # Packet duplication / dual connectivity name no body or 3GPP-only system: two known misses of 30.
  assert len(wrong) <= 2, wrong
  spec = {"path": f"{shared_data}/teleqna/TeleQnA.json", "categories": list(items.STANDARDS), "limit": 40}
  assert {it["tag"] for it in items.load_items(spec, "mcq", "s")} <= set(items.TAGS)


@pytest.mark.parametrize("question, explanation, tag", [
    ("What is X? [3GPP Release 17]", "", "3GPP"),
    ("What is X? [IEEE 802.3]", "", "IEEE"),
    ("What is X? [TCP/IP]", "It is 3GPP's.", "other"),  # the bracketed source wins
    ("What does TS 38.331 define?", "", "3GPP"),
    ("Which timer applies in Rel-16?", "", "3GPP"),
    ("What does the gNB send?", "", "3GPP"),
    ("What rate does Wi-Fi 6 reach?", "", "IEEE"),
    ("Which field?", "IEEE 802.11ax defines it.", "IEEE"),
    ("What is SCMA?", "A multiple access scheme.", "other"),
])
def test_source_tag_rules(question, explanation, tag):
  assert items.source_tag(question, explanation) == tag


def test_set_style_defaults_overrides_and_errors():
  cfg = ml_collections.ConfigDict({"style": "cloze", "template": mcq.DEFAULT_TEMPLATE,
                                   "letter_template": mcq.LETTER_TEMPLATE})
  assert mcq.set_style({}, cfg, "mcq.sets[0]") == ("cloze", mcq.DEFAULT_TEMPLATE)
  assert mcq.set_style({"style": "letter"}, cfg, "mcq.sets[0]") == ("letter", mcq.LETTER_TEMPLATE)
  assert mcq.set_style({"style": "letter", "template": "chatml"}, cfg, "s") == ("letter", "chatml")
  with pytest.raises(JaxteleError, match=r"mcq\.sets\[1\]\.style: unknown style 'letters'"):
    mcq.set_style({"style": "letters"}, cfg, "mcq.sets[1]")
  with pytest.raises(JaxteleError, match=r"mcq\.sets\[1\]\.template: a letter-choice template needs an \{options\}"):
    mcq.set_style({"style": "letter", "template": "Q: {question}\nA:"}, cfg, "mcq.sets[1]")


def test_letter_prompt_lists_the_options():
  it = {"question": "Which one?", "options": ["UPF", "SMF", "All of the above"]}
  assert mcq.context(it, mcq.LETTER_TEMPLATE, None, "letter") == \
      "Question: Which one?\nA. UPF\nB. SMF\nC. All of the above\nAnswer:"
  assert mcq.context(it, mcq.DEFAULT_TEMPLATE, None, "cloze") == "Question: Which one?\nAnswer:"
