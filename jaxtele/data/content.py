"""What a 3GPP clause is made of, read from its Markdown: prose, tables (pipe rows) or ASN.1.

Every non-blank line gets one label and weighs its character count:
- `asn1`: inside a `-- ASN1START` .. `-- ASN1STOP` block (a block may run on past a heading, so a clause can
  open mid-block: lines with `::=` or starting with `--` count too);
- `table`: a Markdown pipe row (`| ... |`);
- `prose`: everything else (headings, paragraphs, list items, notes).
`content_type` is the label holding most characters, so each clause falls in exactly one bin.
"""

import re

CONTENT_TYPES = ("prose", "table", "asn1")
ASN1_START, ASN1_STOP = re.compile(r"^\s*--\s*ASN1START"), re.compile(r"^\s*--\s*ASN1STOP")
ASN1_LINE = re.compile(r"::=|^\s*--")


def content_shares(markdown: str) -> dict:
  """{prose, table, asn1: fraction of the non-blank characters}; all zero for a blank text."""
  chars = dict.fromkeys(CONTENT_TYPES, 0)
  in_asn1 = False
  for line in markdown.splitlines():
    if ASN1_START.match(line):
      in_asn1 = True
    stripped = line.strip()
    if stripped:
      if in_asn1 or ASN1_LINE.search(line):
        label = "asn1"
      elif stripped.startswith("|"):
        label = "table"
      else:
        label = "prose"
      chars[label] += len(stripped)
    if ASN1_STOP.match(line):
      in_asn1 = False
  total = sum(chars.values())
  return {k: (v / total if total else 0.0) for k, v in chars.items()}


def content_type(markdown: str) -> str:
  """The label holding most of the clause's characters (ties: prose, then table)."""
  shares = content_shares(markdown)
  return max(CONTENT_TYPES, key=lambda k: (shares[k], -CONTENT_TYPES.index(k)))
