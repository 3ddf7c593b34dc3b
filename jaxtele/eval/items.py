"""Evaluation items from disk, every bad one reported as `file:line: ...`.

Multiple choice: JSON list / JSONL of `{question, options: [..], answer: index or option text, category?}`.
Open QA: JSON list / JSONL of `{question, answer, category?}`. TeleQnA (`TeleQnA.json`, an object
`"question N" -> {question, option 1..5, answer: "option k: text", explanation, category}`) yields both,
optionally as a fixed seeded sample of some categories.
"""

import bisect
import json
import os
import re

import numpy as np

from jaxtele.errors import JaxteleError

_WS = re.compile(r"\s*")
STANDARDS = ("Standards specifications", "Standards overview")
TAGS = ("3GPP", "IEEE", "other")
# TeleQnA marks most standards questions with their source, "[3GPP Release 17]", "[IEEE 802.11]", "[TCP/IP]";
# the rest are read from the question and explanation: a standards body or spec number first, then technology
# names only one body defines (NR, LTE... are 3GPP's; Wi-Fi is IEEE 802.11).
_BRACKET = re.compile(r"\[([^\[\]]+)\]\s*$")
_BODY = (("3GPP", re.compile(r"\b3GPP\b|\bT[SR] ?\d{2}\.\d{3}|\bRel(?:ease|\.|-)? ?\d{1,2}\b|\bTSGs?\b")),
         ("IEEE", re.compile(r"\bIEEE\b|\b802\.\d+")))
_TECH = (("3GPP", re.compile(r"\b(?:NR|LTE|E-UTRAN?|NG-RAN|gNBs?|eNBs?|[eg]NodeBs?|5GC|EPC|EPS|RedCap|NAS)\b")),
         ("IEEE", re.compile(r"\bWi-?Fi\b|\bWLANs?\b")))


def source_tag(question: str, explanation: str = "") -> str:
  """3GPP / IEEE / other: which body's standard a TeleQnA question is about."""
  m = _BRACKET.search(question)
  if m:
    return next((tag for tag in ("3GPP", "IEEE") if tag in m.group(1)), "other")
  text = f"{question} {explanation}"
  for rules in (_BODY, _TECH):
    for tag, pattern in rules:
      if pattern.search(text):
        return tag
  return "other"


def _line_finder(text: str):
  newlines = [m.start() for m in re.finditer("\n", text)]
  return lambda offset: bisect.bisect_left(newlines, offset) + 1


def json_records(path: str):
  """[(key or None, object, line)] of a JSONL file, a JSON list, or a JSON object's values."""
  if not os.path.isfile(path):
    raise JaxteleError(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise JaxteleError(f"{path}: not UTF-8") from None
  if path.endswith(".jsonl"):
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          out.append((None, json.loads(line), lineno))
        except json.JSONDecodeError as e:
          raise JaxteleError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return out
  return list(_container(text, path))


def _container(text: str, path: str):
  """The members of a top-level JSON list or object, each with the line it starts on."""
  dec, line_of = json.JSONDecoder(), _line_finder(text)
  i = _WS.match(text, 0).end()
  if i >= len(text) or text[i] not in "[{":
    raise JaxteleError(f"{path}:{line_of(i)}: expected a JSON list or object")
  opener, closer = text[i], "]" if text[i] == "[" else "}"
  i = _WS.match(text, i + 1).end()
  try:
    while i < len(text) and text[i] != closer:
      key = None
      if opener == "{":
        key, i = dec.raw_decode(text, i)
        i = _WS.match(text, i).end()
        if text[i] != ":":
          raise json.JSONDecodeError("expected ':'", text, i)
        i = _WS.match(text, i + 1).end()
      start = i
      value, i = dec.raw_decode(text, i)
      yield key, value, line_of(start)
      i = _WS.match(text, i).end()
      if i < len(text) and text[i] == ",":
        i = _WS.match(text, i + 1).end()
      elif i >= len(text) or text[i] != closer:
        raise json.JSONDecodeError(f"expected ',' or '{closer}'", text, i)
  except json.JSONDecodeError as e:
    raise JaxteleError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def _string(obj, field, where):
  value = obj.get(field) if isinstance(obj, dict) else None
  if not isinstance(value, str) or not value.strip():
    raise JaxteleError(f"{where}: needs a non-empty string {field!r}")
  return value


def mcq_item(obj, where: str) -> dict:
  """A validated MCQ item; `answer` becomes the option's index."""
  question = _string(obj, "question", where)
  options = obj.get("options")
  if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
    raise JaxteleError(f"{where}: 'options' must be a list of at least two strings")
  answer = obj.get("answer")
  if isinstance(answer, bool) or not isinstance(answer, (int, str)):
    raise JaxteleError(f"{where}: 'answer' must be an option index or an option's text")
  if isinstance(answer, int):
    if not 0 <= answer < len(options):
      raise JaxteleError(f"{where}: answer index {answer} is not among its {len(options)} options")
    index = answer
  elif answer in options:
    index = options.index(answer)
  else:
    raise JaxteleError(f"{where}: answer {answer!r} is not among its options")
  return {"id": str(obj.get("id", where)), "question": question, "options": options, "answer": index,
          "category": str(obj.get("category", "all")), "tag": str(obj.get("tag", "all"))}


def qa_item(obj, where: str) -> dict:
  answer = _string(obj, "answer", where)
  return {"id": str(obj.get("id", where)), "question": _string(obj, "question", where), "answer": answer,
          "references": [answer], "category": str(obj.get("category", "all"))}


def teleqna_item(key, obj, where: str) -> dict:
  """TeleQnA's record -> an MCQ item plus `explanation` (its answer reads 'option k: text')."""
  if not isinstance(obj, dict):
    raise JaxteleError(f"{where}: not a JSON object")
  numbered = sorted((int(k.split()[1]), v) for k, v in obj.items() if re.fullmatch(r"option \d+", k))
  options = [v for _, v in numbered]
  if [n for n, _ in numbered] != list(range(1, len(options) + 1)):
    raise JaxteleError(f"{where}: options must be numbered 'option 1'..'option {len(options)}'")
  m = re.match(r"option (\d+):\s?(.*)$", str(obj.get("answer", "")), re.S)
  if not m or not 1 <= int(m.group(1)) <= len(options):
    raise JaxteleError(f"{where}: answer {obj.get('answer')!r} is not among its options")
  item = mcq_item({"question": obj.get("question"), "options": options, "answer": int(m.group(1)) - 1,
                   "category": obj.get("category", "all"), "id": key}, where)
  item["explanation"] = str(obj.get("explanation") or "")
  item["tag"] = source_tag(item["question"], item["explanation"])
  return item


def sample(items: list, categories=(), limit: int = 0, seed: int = 0) -> list:
  """Items of the given categories (all if none); with `limit`, a fixed seeded sample, in file order."""
  if categories:
    items = [it for it in items if it["category"] in categories]
  if limit and limit < len(items):
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:limit])
    items = [items[i] for i in keep]
  return items


def load_items(spec: dict, kind: str, where: str) -> list:
  """Items of one configured set. spec: {path, format: teleqna|mcq|qa, categories, limit, seed,
  answer_field (teleqna open QA: option | explanation | option+explanation)}; kind: mcq | qa."""
  path, fmt = spec.get("path", ""), spec.get("format", "teleqna" if "teleqna" in spec.get("path", "").lower() else kind)
  if fmt not in ("teleqna", "mcq", "qa"):
    raise JaxteleError(f"{where}.format: unknown item format {fmt!r} (choose from teleqna, mcq, qa)")
  if kind == "mcq" and fmt == "qa":
    raise JaxteleError(f"{where}.format: a multiple-choice set needs options (format mcq or teleqna)")
  records = json_records(path)
  items = []
  for key, obj, line in records:
    loc = f"{path}:{line}" + (f" ({key})" if key else "")
    if fmt == "teleqna":
      items.append(teleqna_item(key, obj, loc))
    elif fmt == "mcq":
      items.append(mcq_item(obj if isinstance(obj, dict) else {}, loc))
    else:
      items.append(qa_item(obj if isinstance(obj, dict) else {}, loc))
  items = sample(items, tuple(spec.get("categories", ()) or ()), int(spec.get("limit", 0) or 0),
                 int(spec.get("seed", 0)))
  if kind == "qa" and fmt != "qa":
    items = [as_open_qa(it, spec.get("answer_field", "option"), where) for it in items]
  if not items:
    raise JaxteleError(f"{where}: {path} gives an empty evaluation set (categories {list(spec.get('categories', []))})")
  return items


def as_open_qa(item: dict, answer_field: str, where: str) -> dict:
  """An MCQ item as an open question: its correct option (and/or explanation) is the reference answer."""
  option = item["options"][item["answer"]]
  answers = {"option": option, "explanation": item.get("explanation") or option,
             "option+explanation": f"{option}. {item.get('explanation', '')}".strip()}
  if answer_field not in answers:
    raise JaxteleError(f"{where}.answer_field: {answer_field!r} is not one of {', '.join(answers)}")
  return {"id": item["id"], "question": item["question"], "answer": answers[answer_field],
          "references": [option], "category": item["category"]}
