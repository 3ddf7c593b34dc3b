"""3GPP specifications (Markdown converted from Word) -> clause-level documents.

Each `#`..`######` heading opens a clause; its number is glued to the title (`#### 4.3.5.2Change of SSC
mode 3`). Everything before the first heading (title page, copyright notice, table of contents), the
Foreword and the change-history annex is boilerplate: dropped and accounted for, never silently.
"""

import collections
import dataclasses
import os
import re

from jaxtele.errors import JaxteleError

HEADING = re.compile(r"^(#{1,6}) (.+)$")
CLAUSE = re.compile(r"^((?:\d+|[A-Z])(?:\.\d+[a-z]?)+|\d+[a-z]?|Annex [A-Z]+)\s*(.*)$")
SPEC_NUMBER = re.compile(r"^(\d{2}\.\d{3}(?:-\d+)?)")
BOILERPLATE_TITLES = ("Foreword", "Change history")
# Embedded Word objects survive conversion as runs of CJK / private-use code points.
GARBLED_FRACTION = 0.05


def garbled(text: str) -> bool:
  return sum(ord(c) > 0x2FFF for c in text) > GARBLED_FRACTION * len(text)


@dataclasses.dataclass
class Clause:
  id: str  # "TS 38.321 5.4.2.1": spec + clause number, unique within the corpus
  text: str


def spec_number(filename: str) -> str:
  m = SPEC_NUMBER.match(os.path.basename(filename))
  return f"TS {m.group(1)}" if m else os.path.splitext(os.path.basename(filename))[0]


def split_spec(text: str, spec: str, dropped: collections.Counter | None = None, measure=len) -> list[Clause]:
  """Split one spec into clauses; `dropped` counts what was left out (`measure`: chars, or tokens), by reason."""
  dropped = dropped if dropped is not None else collections.Counter()
  clauses, seen = [], collections.Counter()
  lines = text.splitlines()
  starts = [i for i, line in enumerate(lines) if HEADING.match(line)]
  if not starts:
    dropped["no_headings"] += measure(text)
    return []
  dropped["front_matter"] += measure("\n".join(lines[:starts[0]]))
  for a, b in zip(starts, starts[1:] + [len(lines)]):
    title = HEADING.match(lines[a]).group(2).strip()
    body = "\n".join(lines[a + 1:b]).strip()
    m = CLAUSE.match(title)
    number, name = (m.group(1), m.group(2).strip()) if m else ("", title)
    if any(t in title for t in BOILERPLATE_TITLES):
      dropped["boilerplate"] += measure("\n".join(lines[a:b]))
      continue
    if not body:
      dropped["heading_only"] += measure(lines[a])
      continue
    if garbled(title + body):
      dropped["garbled"] += measure("\n".join(lines[a:b]))
      continue
    key = number or name
    seen[key] += 1
    suffix = f"#{seen[key]}" if seen[key] > 1 else ""
    clauses.append(Clause(f"{spec} {key}{suffix}", f"{number} {name}".strip() + "\n" + body))
  return clauses


def read_specs_file(path: str, dropped: collections.Counter | None = None, measure=len) -> list[Clause]:
  with open(path, encoding="utf-8") as f:
    return split_spec(f.read(), spec_number(path), dropped, measure)


def read_specs(folder: str, dropped: collections.Counter | None = None, measure=len) -> list[Clause]:
  """All clauses of every `.md` spec in `folder`, in file order."""
  if not os.path.isdir(folder):
    raise JaxteleError(f"{folder}: no such folder of 3GPP specifications")
  out = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(".md"):
      out.extend(read_specs_file(os.path.join(folder, name), dropped, measure))
  return out
