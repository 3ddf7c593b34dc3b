"""Token F1 / exact match, the Wilson interval, item loading and the bad-input errors (no model needed)."""

import json

import pytest

from jaxtele.errors import JaxteleError
from jaxtele.eval import items, prompts, qa_metrics
from jaxtele.eval.mcq import wilson


@pytest.mark.parametrize("pred, ref, f1, em", [
    ("The Paris", "paris", 1.0, 1.0),  # case and article
    ("Paris, France!", "paris france", 1.0, 1.0),  # punctuation
    ("an AMF", "AMF", 1.0, 1.0),
    ("the access and mobility function", "Access and Mobility Management Function",
     2 * (4 / 4 * 4 / 5) / (4 / 4 + 4 / 5), 0.0),  # 4 common words: precision 4/4, recall 4/5 -> F1 8/9
    ("SMF SMF", "SMF", 2 * (1 / 2 * 1) / (1 / 2 + 1), 0.0),  # bag of words: the repeat counts once in common
    ("UPF", "AMF", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("a the", "UPF", 0.0, 0.0),  # nothing left after normalisation
])
def test_token_f1_and_exact_match_hand_checked(pred, ref, f1, em):
  assert qa_metrics.token_f1(pred, ref) == pytest.approx(f1)
  assert qa_metrics.exact_match(pred, ref) == em


def test_scores_average_per_item_best_reference():
  s = qa_metrics.score(["paris", "upf", "x y"], [["Paris"], ["AMF", "the UPF"], ["x z"]])
  assert s["f1"] == pytest.approx((1 + 1 + 0.5) / 3) and s["exact_match"] == pytest.approx(2 / 3)


def test_wilson_interval_matches_published_values():
  # Wilson 95% intervals as tabulated (Newcombe 1998, Table I): 81/263 -> [0.2553, 0.3662];
  # 15/148 -> [0.0624, 0.1605]
  assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
  assert wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
  assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)


def write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_mcq_answer_not_among_options_names_file_and_line(tmp_path):
  good = {"question": "q", "options": ["a", "b"], "answer": 1}
  path = write_jsonl(tmp_path / "m.jsonl", [good, good, {"question": "q", "options": ["a", "b"], "answer": "c"}])
  with pytest.raises(JaxteleError, match=r"m\.jsonl:3: answer 'c' is not among its options"):
    items.load_items({"path": path, "format": "mcq"}, "mcq", "mcq.sets[0]")
  path = write_jsonl(tmp_path / "i.jsonl", [{"question": "q", "options": ["a", "b"], "answer": 2}])
  with pytest.raises(JaxteleError, match=r"i\.jsonl:1: answer index 2 is not among its 2 options"):
    items.load_items({"path": path, "format": "mcq"}, "mcq", "mcq.sets[0]")


def test_teleqna_bad_answer_names_line_in_json_object(tmp_path):
  path = tmp_path / "TeleQnA.json"
  path.write_text('{\n "question 0": {"question": "q", "option 1": "a", "option 2": "b",\n'
                  '   "answer": "option 2: b", "category": "Lexicon"},\n'
                  ' "question 1": {"question": "q", "option 1": "a", "option 2": "b",\n'
                  '   "answer": "option 3: c", "category": "Lexicon"}\n}\n')
  with pytest.raises(JaxteleError, match=r"TeleQnA\.json:4 \(question 1\): answer 'option 3: c' is not among"):
    items.load_items({"path": str(path)}, "mcq", "mcq.sets[0]")


def test_empty_eval_set_is_refused(tmp_path):
  path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "options": ["a", "b"], "answer": 0, "category": "X"}])
  with pytest.raises(JaxteleError, match=r"mcq\.sets\[0\]: .*m\.jsonl gives an empty evaluation set"):
    items.load_items({"path": path, "format": "mcq", "categories": ["Y"]}, "mcq", "mcq.sets[0]")


def test_template_without_question_slot_is_refused():
  with pytest.raises(JaxteleError, match=r"open_qa\.template: template 'Answer: ' has no \{question\} slot"):
    prompts.check("Answer: ", "open_qa.template")
  prompts.check("Q: {question}\nA:", "open_qa.template")
  prompts.check("alpaca", "open_qa.template")


def test_teleqna_sample_is_fixed_and_in_the_given_categories(shared_data):
  spec = {"path": f"{shared_data}/teleqna/TeleQnA.json", "categories": list(items.STANDARDS), "limit": 50, "seed": 0}
  a = items.load_items(spec, "mcq", "s")
  b = items.load_items(spec, "mcq", "s")
  assert [x["id"] for x in a] == [x["id"] for x in b] and len(a) == 50
  assert {x["category"] for x in a} <= set(items.STANDARDS)
  raw = json.load(open(spec["path"]))
  for x in a[:10]:  # the answer index points at the text TeleQnA names
    assert raw[x["id"]]["answer"] == f"option {x['answer'] + 1}: {x['options'][x['answer']]}"
  qa = items.load_items(spec, "qa", "s")
  assert [q["answer"] for q in qa[:5]] == [x["options"][x["answer"]] for x in a[:5]]


def test_the_training_template_is_used_only_for_instruction_tuned_runs():
  import ml_collections

  from jaxtele.eval.prompts import run_template

  sft_run = ml_collections.ConfigDict({"data": {"format": "sft", "sft_template": "chatml"}})
  cpt_run = ml_collections.ConfigDict({"data": {"format": "tokens", "sft_template": "alpaca"}})
  assert run_template("runs/x", sft_run)[0] == "chatml"
  template, why = run_template("runs/x", cpt_run)
  assert template is None and "data.format='tokens'" in why
